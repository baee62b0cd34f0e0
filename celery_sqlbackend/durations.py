"""Ages and durations as people read them: one scale for ``celery sqlq`` and the dashboard.

The terminal's columns are narrow ("1.5m"); the dashboard spells units out ("1.5 min").
"""
from __future__ import annotations

#: (below this many seconds, divide by, compact unit, spelt-out unit)
_SCALE = ((1, 0.001, "ms", "ms"), (120, 1, "s", "s"), (7200, 60, "m", "min"), (172800, 3600, "h", "h"),
          (float("inf"), 86400, "d", "d"))


def human(seconds: float | None, *, compact: bool = False) -> str:
    """``seconds`` in the largest unit that keeps the figure readable; "-" for unknown."""
    if seconds is None:
        return "-"
    for below, unit_seconds, short, long in _SCALE:
        if seconds < below:
            value = seconds / unit_seconds
            text = f"{value:.0f}" if unit_seconds < 1 else f"{value:.1f}"
            return f"{text}{short}" if compact else f"{text} {long}"
    raise AssertionError("unreachable: the last unit has no upper bound")
