"""``Concurrency(n, key=…, duration=…)``: at most ``n`` jobs of one key run at once, on every worker.

A job takes one of the key's ``n`` slots when it is enqueued (or when its
ETA comes), or waits as a *blocked execution* until a slot frees: its job
finishes, fails, is pruned, or the slot is older than ``duration`` (the
guard against a holder that vanished without a word).  Blocked jobs of a key
are let in by priority, then first in, first out; keys never wait on each other.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

from ..errors import ConfigurationError

#: A slot is given back after this long, whatever its holder is doing (seconds).
DEFAULT_DURATION = 3600.0

KeyTemplate = str | Callable[..., Any] | None


@dataclass(frozen=True)
class Concurrency:
    """At most ``limit`` jobs whose ``key`` is the same run at once (see the module doc).

    ``key``: a ``str.format`` template applied to the task's arguments
    (``"account:{account_id}"``, ``"{0}"``), a callable taking them, or None
    (every call of the task shares one key: its name).  Keys are global: two
    tasks naming the same key share its slots.
    ``duration``: seconds (or a ``timedelta``) after which a slot is given back
    even if its job never reported; make it longer than the task can run.
    """
    limit: int
    key: KeyTemplate = None
    duration: float | timedelta = DEFAULT_DURATION

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1:
            raise ConfigurationError(f"Concurrency({self.limit!r}): the limit is a whole number of jobs >= 1, "
                                     "e.g. Concurrency(2, key='account:{account_id}')")
        duration = self.duration.total_seconds() if isinstance(self.duration, timedelta) else self.duration
        if isinstance(duration, bool) or not isinstance(duration, numbers.Real) or duration <= 0:
            raise ConfigurationError(f"Concurrency(duration={self.duration!r}): write a number of seconds > 0 "
                                     "(or a timedelta), longer than the task can run")
        object.__setattr__(self, "duration", float(duration))
