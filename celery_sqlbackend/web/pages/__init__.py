"""One module per dashboard area: each exports ``routes`` (and ``AREA`` when it has a nav entry)."""
