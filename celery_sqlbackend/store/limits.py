"""``store.limits``: the gateway of every limit table (``job_limits``, ``semaphores``,
``semaphore_holds``, ``blocked_executions``, ``rate_keys``).

One gateway for the family, over four statement modules, because its
statements compose across them: giving a slot back (``semaphores``) lets a
blocked job in (``blocked``), which may then wait on a rate (``rates``):
``admission`` routes between them.  Taking a slot and blocking are part of
the enqueue (``jobs.insert_one``); everything else is here.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Sequence

from . import admission, blocked, rates, semaphores
from .claims import Claimed
from .gateway import Gateway


class Limits(Gateway):
    """``store.limits``: release and let in, claim within rates, the chores, the operator's counts."""

    __slots__ = ()

    def release(self, *, job_ids: Sequence[int], now: datetime) -> list[int]:
        """Give back the slots ``job_ids`` hold; returns the jobs let in."""
        return self.store.run(admission.release, self.t, self.d, job_ids=job_ids, now=now)

    def let_in(self, *, key: str, now: datetime) -> list[int]:
        return self.store.run(admission.let_in, self.t, self.d, key=key, now=now)

    def dispatch_due(self, *, now: datetime, limit: int) -> int:
        """Admit scheduled jobs with limits whose ETA came (by their limits)."""
        return self.store.run(admission.dispatch_due, self.t, self.d, now=now, limit=limit)

    def claim_rated(self, *, queues: Sequence[str], limit: int, process_id: int,
                    now: datetime) -> tuple[list[Claimed], datetime]:
        """Claim rate-blocked jobs within their keys' rates (``rates.claim``), and the time counted."""
        return self.store.run(rates.claim, self.t, self.d, queues=queues, limit=limit, process_id=process_id, now=now)

    def next_open(self) -> datetime | None:
        return self.store.read(rates.next_open, self.t)

    def expired(self, *, now: datetime, limit: int) -> list[int]:
        return self.store.read(semaphores.expired, self.t, now=now, limit=limit)

    def orphaned(self, *, limit: int) -> list[int]:
        return self.store.read(semaphores.orphaned, self.t, limit=limit)

    def starved_keys(self, *, now: datetime, limit: int) -> list[str]:
        return self.store.read(semaphores.starved_keys, self.t, now=now, limit=limit)

    def has_due(self, *, now: datetime) -> bool:
        return self.store.read(admission.has_due, self.t, now=now)

    def forget_idle(self, *, before: datetime, limit: int) -> int:
        return self.store.run(semaphores.forget_idle, self.t, before=before, limit=limit)

    def in_use(self) -> bool:
        return self.store.read(semaphores.in_use, self.t)

    def holds_by_key(self, *, now: datetime, limit: int = 20) -> list[Any]:
        return self.store.read(semaphores.holds_by_key, self.t, now=now, limit=limit)

    def rate_keys(self, *, limit: int = 20) -> list[Any]:
        return self.store.read(rates.waiting_keys, self.t, limit=limit)

    def blocked_counts(self, *, limit: int = 20) -> list[Any]:
        return self.store.read(blocked.counts, self.t, limit=limit)

    def blocked_total(self) -> int:
        return self.store.read(blocked.total, self.t)
