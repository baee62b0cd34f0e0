"""Celery's ``saferepr`` of flat task arguments, without its token stream.

Why: every task message carries ``argsrepr`` and ``kwargsrepr``, Celery's
``saferepr`` of the arguments.  That function streams tokens through a deque
so that it can cut deep or huge values safely; for the arguments most tasks
take (a few ids and names) that costs more than everything else a group's
message needs (``message_templates``).  ``plain_repr`` writes the same text
directly for a tuple, list or dict of ``int``, ``float``, ``bool``, ``str`` and
``None`` whose text fits in ``maxlen``, and gives up (None) on anything else,
which then goes to ``saferepr`` itself.  The rules copied are ``saferepr``'s,
not ``repr``'s: numbers as ``str()``, strings in single quotes with only
``'`` escaped, ``(x,)`` for one-tuples, and nothing cut when the text fits
(``tests/enqueue/test_plain_repr.py`` checks them against ``saferepr``).
"""
from __future__ import annotations

from typing import Any

_NUMBERS = (int, float, bool)


def _scalar(value: Any) -> str | None:
    kind = type(value)
    if kind is str:
        return "'" + value.replace("'", "\\'") + "'"
    if kind in _NUMBERS:
        return str(value)
    if value is None:
        return "None"
    return None


def plain_repr(value: Any, maxlen: int | None) -> str | None:
    """``saferepr(value, maxlen)`` for flat, simple arguments; None for anything else."""
    kind = type(value)
    parts: list[str] = []
    if kind is tuple or kind is list:
        for item in value:
            text = _scalar(item)
            if text is None:
                return None
            parts.append(text)
        body = ", ".join(parts)
        if kind is list:
            result = "[" + body + "]"
        else:
            result = "(" + body + (",)" if len(parts) == 1 else ")")
    elif kind is dict:
        for key, item in value.items():
            key_text, item_text = _scalar(key), _scalar(item)
            if key_text is None or item_text is None:
                return None
            parts.append(key_text + ": " + item_text)
        result = "{" + ", ".join(parts) + "}"
    else:
        return None
    return result if maxlen is None or len(result) <= maxlen else None
