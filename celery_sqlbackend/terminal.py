"""Stored data on a terminal, literally.

Why: queue names, task names, arguments and error messages are written by
whoever publishes a job, and ``celery sqlq`` prints them.  Passed to rich as
markup, ``[/oops]`` crashes a table and ``[link=…]`` plants a clickable link;
passed to a terminal raw, an ESC byte drives it.  So every stored value
becomes a rich ``Text`` (never parsed as markup) with its control characters
shown as escapes (``\\x1b``), and only our own labels carry styles.
"""
from __future__ import annotations

import unicodedata
from typing import Any

from rich.text import Text

_KEPT = frozenset("\n\t")


def plain(value: Any, keep_newlines: bool = False) -> str:
    """``value`` as text with every control or format character escaped (``\\x1b``, ``\\u202e``)."""
    text = "" if value is None else str(value)
    if text.isprintable():
        return text
    return "".join(ch if (keep_newlines and ch in _KEPT) or not unicodedata.category(ch).startswith("C")
                   else _escape(ch) for ch in text)


def literal(value: Any, style: str = "", keep_newlines: bool = False) -> Text:
    """``value`` as a rich ``Text``: shown as written, never read as markup, controls escaped."""
    return Text(plain(value, keep_newlines), style=style)


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else (f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
