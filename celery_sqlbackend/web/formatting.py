"""Jinja filters: ages, timestamps and numbers as people read them (every timestamp is naive UTC)."""
from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from ..durations import human
from ..store import utcnow


def age(seconds: float | None) -> str:
    return human(seconds)


def since(value: datetime | None) -> str:
    """``value`` as "3.2 min ago" (or "in 5.0 min" for the future)."""
    if value is None:
        return "-"
    delta = (utcnow() - value).total_seconds()
    return f"{age(delta)} ago" if delta >= 0 else f"in {age(-delta)}"


def ts(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


def num(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def last_line(value: str | None, width: int = 200) -> str:
    """The last non-empty line of a traceback (where the error itself is), shortened."""
    lines = [line for line in (value or "").splitlines() if line.strip()]
    return lines[-1].strip()[:width] if lines else ""


def query(params: dict[str, Any], **changes: Any) -> str:
    """A query string from ``params`` with ``changes`` applied (None or "" drops a key)."""
    merged = {**params, **changes}
    return urlencode({k: v for k, v in merged.items() if v not in (None, "")})


def install(env) -> None:
    env.filters.update(age=age, since=since, ts=ts, num=num, last_line=last_line)
    env.globals.update(query=query)
