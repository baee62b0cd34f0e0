"""What waits on limits, for ``celery sqlq status``: blocked jobs per key, and the keys' state."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from ..store import Store, utcnow


@dataclass(frozen=True)
class BlockedKey:
    """Jobs of one queue waiting on one limit key."""
    kind: str                 # "concurrency" (for a slot) or "rate" (for a start)
    key: str
    queue: str
    blocked: int
    #: Concurrency: slots held now, of ``limit``; Rate: starts per ``period`` seconds.
    held: int | None
    limit: int | None
    period: float | None
    #: Rate: when the key next lets a job start (None: now, or nothing waits).
    next_open: datetime | None


@dataclass(frozen=True)
class LimitsStatus:
    keys: list[BlockedKey]
    #: Blocked jobs in all (``keys`` lists the most blocked keys).
    total: int


def limits_status(store: Store, limit: int = 20) -> LimitsStatus:
    """The ``limit`` keys with the most blocked jobs, and how many jobs are blocked in all."""
    now = utcnow()
    holds = {row.key: (row.held, row.slots) for row in store.limits.holds_by_key(now=now, limit=1000)}
    rates = {row.key: row for row in store.limits.rate_keys(limit=1000)}
    keys = []
    for row in store.limits.blocked_counts(limit=limit):
        if row.kind == "rate":
            r = rates.get(row.key)
            keys.append(BlockedKey(row.kind, row.key, row.queue_name, row.jobs, None, r.max_starts if r else None,
                                   r.period if r else None, r.next_open if r and r.next_open > now else None))
        else:
            held, slots = holds.get(row.key, (0, None))
            keys.append(BlockedKey(row.kind, row.key, row.queue_name, row.jobs, held, slots, None, None))
    return LimitsStatus(keys=keys, total=store.limits.blocked_total())
