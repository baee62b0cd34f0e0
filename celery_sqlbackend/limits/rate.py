"""``Rate("10/s", key=…)``: at most N starts of one key per period, counted over every worker.

Enforced when a worker claims: a job over its key's rate is not claimed, and
waits (as a blocked execution, in order) until the oldest of the key's last N
starts is a period old; workers do not poll it meanwhile, they know when the
key opens.  Unlike Celery's ``rate_limit``, which each worker process counts
by itself (ten processes with "10/s" start a hundred a second), the count is
one for the whole database.

The period is a sliding window: no window of one period holds more than N
claims of a key.  A start here is the *claim*; the task begins a moment
later in a pool process, and later still when the worker prefetches (keep
``worker_prefetch_multiplier = 1`` for rate-limited queues).  A slot is taken
again only ``GUARD`` of a period after it opened, so that this moment does not
push a window over N.
"""
from __future__ import annotations

import numbers
import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from ..errors import ConfigurationError
from .concurrency import KeyTemplate

#: Periods by their letter, in seconds (Celery's ``rate_limit`` letters).
PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
#: Fraction of a period a slot waits beyond it (see the module doc; ``store.rates`` applies it).
GUARD = 0.02
_TEXT = re.compile(r"^\s*(\d+)\s*/\s*(\d*(?:\.\d+)?)\s*([smhd])\s*$")


def parse(rate: Any) -> tuple[int, float]:
    """``"10/s"``, ``"100/m"``, ``"5/10s"``, or ``(10, timedelta(seconds=1))`` → (starts, period in seconds)."""
    if isinstance(rate, tuple) and len(rate) == 2:
        count, period = rate
        seconds = period.total_seconds() if isinstance(period, timedelta) else period
        if (isinstance(count, int) and not isinstance(count, bool) and count >= 1
                and isinstance(seconds, numbers.Real) and seconds > 0):
            return count, float(seconds)
    match = _TEXT.match(rate) if isinstance(rate, str) else None
    if match and int(match.group(1)) >= 1 and (match.group(2) in ("", None) or float(match.group(2)) > 0):
        return int(match.group(1)), float(match.group(2) or 1) * PERIODS[match.group(3)]
    raise ConfigurationError(f"Rate({rate!r}) is not a rate: write starts per period, e.g. '10/s', '100/m', "
                             "'5/10s' (five every ten seconds), or (10, timedelta(seconds=1))")


@dataclass(frozen=True)
class Rate:
    """At most ``limit`` starts of a key per ``period`` seconds (see the module doc).

    ``key``: as for ``Concurrency``: a template, a callable, or None (the task's name).
    """
    rate: str | tuple[int, Any]
    key: KeyTemplate = None
    limit: int = field(init=False)
    period: float = field(init=False)

    def __post_init__(self) -> None:
        limit, period = parse(self.rate)
        object.__setattr__(self, "limit", limit)
        object.__setattr__(self, "period", period)
