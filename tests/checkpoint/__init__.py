if __name__ == "checkpoint":  # pragma: no cover - a broken checkout, not a test outcome
    # Without tests/__init__.py pytest imports this directory as the top-level
    # package "checkpoint", shadowing the real one; say so instead of failing oddly.
    raise ImportError("tests/__init__.py is missing: pytest would import tests/checkpoint as the "
                      "'checkpoint' package and shadow the real one")
