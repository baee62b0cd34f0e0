"""Where a limited job goes when it may run: ready, or blocked on a limit.

A job's limits (``JobLimits``, from its ``sqlq_limits`` header) are kept in
``job_limits`` while the job exists.  The job is *admitted* when it becomes
runnable: at enqueue, or when its ETA comes (``dispatch_due`` here: the
plain ``executions.dispatch_due`` leaves jobs with limits alone).  Admission checks its limits in order:

1. ``Concurrency``: take a slot of the key (``semaphores.acquire``), or wait
   blocked on it; a released slot lets it in later (``after_slot``);
2. ``Rate``: wait blocked on the key until a worker claims it within the rate
   (``rates.claim``): a rate is counted when a job starts, not before;
3. otherwise (or then) ready, like any job.

Giving a slot back (``release``) lets the next blocked jobs of the key in
(``after_slot``), in the same transaction, under the key's lock.

Jobs without limits never come here: enqueue, claim and finish are unchanged for them.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Sequence

from sqlalchemy import Connection, delete, insert, select

from . import blocked, rates, semaphores
from .dialects import Dialect
from .executions import make_ready, notify_ready
from .schema import Tables


@dataclass(frozen=True, slots=True)
class JobLimits:
    """The limits one job was enqueued under (keys already formatted)."""
    concurrency_key: str | None = None
    concurrency_limit: int | None = None
    concurrency_duration: float | None = None
    rate_key: str | None = None
    rate_limit: int | None = None
    rate_period: float | None = None

    def row(self, job_id: int) -> dict[str, Any]:
        return {"job_id": job_id, "concurrency_key": self.concurrency_key, "concurrency_limit": self.concurrency_limit,
                "concurrency_duration": self.concurrency_duration, "rate_key": self.rate_key,
                "rate_limit": self.rate_limit, "rate_period": self.rate_period}


def enqueue(conn: Connection, t: Tables, d: Dialect, *, job_id: int, limits: JobLimits, queue: str, priority: int,
            now: datetime, scheduled: bool) -> None:
    """Record a new job's limits; admit it now unless it waits for an ETA (``admit_due`` then)."""
    conn.execute(insert(t.job_limits).values(**limits.row(job_id)))
    if not scheduled:
        admit(conn, t, d, job_id=job_id, limits=limits, queue=queue, priority=priority, now=now)


def admit(conn: Connection, t: Tables, d: Dialect, *, job_id: int, limits: JobLimits, queue: str, priority: int,
          now: datetime, has_slot: bool = False) -> str:
    """Route one runnable job by its limits (module doc); returns "ready", "concurrency" or "rate"."""
    if limits.concurrency_key and not has_slot and not semaphores.acquire(
            conn, t, d, key=limits.concurrency_key, slots=limits.concurrency_limit or 1,
            duration=limits.concurrency_duration or 3600.0, job_id=job_id, now=now):
        blocked.block(conn, t, kind=blocked.CONCURRENCY, key=limits.concurrency_key, job_id=job_id, queue=queue,
                      priority=priority, now=now)
        return blocked.CONCURRENCY
    if limits.rate_key:
        rates.waits(conn, t, d, key=limits.rate_key, max_starts=limits.rate_limit or 1,
                    period=limits.rate_period or 1.0, now=now)
        blocked.block(conn, t, kind=blocked.RATE, key=limits.rate_key, job_id=job_id, queue=queue,
                      priority=priority, now=now)
        return blocked.RATE
    conn.execute(insert(t.ready).values(job_id=job_id, queue_name=queue, priority=priority, created_at=now))
    notify_ready(conn, t, d, queue)
    return "ready"


def limits_of(conn: Connection, t: Tables, job_ids: Sequence[int]) -> dict[int, JobLimits]:
    """The recorded limits of those of ``job_ids`` that have any."""
    if not job_ids:
        return {}
    jl = t.job_limits
    rows = conn.execute(select(jl).where(jl.c.job_id.in_(sorted(set(job_ids))))).all()
    return {row.job_id: JobLimits(**{k: v for k, v in row._mapping.items() if k != "job_id"}) for row in rows}


def dispatch_due(conn: Connection, t: Tables, d: Dialect, *, now: datetime, limit: int) -> int:
    """Admit up to ``limit`` scheduled jobs with limits whose ETA has come (``executions.dispatch_due``
    leaves them alone); returns how many."""
    s, jl = t.scheduled, t.job_limits
    due = (select(s.c.id, s.c.job_id).join(jl, jl.c.job_id == s.c.job_id).where(s.c.scheduled_at <= now)
           .order_by(s.c.scheduled_at, s.c.job_id).limit(limit))
    if d.skip_locked:
        due = due.with_for_update(skip_locked=True, of=s)
    rows = conn.execute(due).all()
    if not rows:
        return 0
    conn.execute(delete(s).where(s.c.id.in_(sorted(row.id for row in rows))))
    found = limits_of(conn, t, [row.job_id for row in rows])
    j = t.jobs
    rows = conn.execute(select(j.c.id, j.c.queue_name, j.c.priority).where(j.c.id.in_(sorted(found)))).all()
    for row in sorted(rows, key=lambda r: r.id):
        admit(conn, t, d, job_id=row.id, limits=found[row.id], queue=row.queue_name, priority=row.priority, now=now)
    return len(rows)


def has_due(conn: Connection, t: Tables, *, now: datetime) -> bool:
    """Any scheduled job with limits whose ETA has come (a read before ``dispatch_due``'s write)."""
    s, jl = t.scheduled, t.job_limits
    return conn.execute(select(s.c.id).join(jl, jl.c.job_id == s.c.job_id).where(s.c.scheduled_at <= now)
                        .limit(1)).first() is not None


def release(conn: Connection, t: Tables, d: Dialect, *, job_ids: Sequence[int], now: datetime) -> list[int]:
    """Give back the slots ``job_ids`` hold and let the next blocked jobs of their keys in.

    Returns the jobs let in.  Holds that are gone already (expired and
    swept, or released by another path) are simply not there: a no-op.
    """
    h = t.semaphore_holds
    if not job_ids:
        return []
    held = conn.execute(select(h.c.key, h.c.job_id).where(h.c.job_id.in_(sorted(set(job_ids))))).all()
    by_key: dict[str, list[int]] = {}
    for row in held:
        by_key.setdefault(row.key, []).append(row.job_id)
    let_in: list[int] = []
    for key in sorted(by_key):
        slots = semaphores.lock_key(conn, t, d, key=key, slots=None, now=now)
        conn.execute(delete(h).where(h.c.job_id.in_(sorted(by_key[key])), h.c.key == key))
        if slots is not None:
            let_in += _let_in_locked(conn, t, d, key=key, slots=slots, now=now)
    return let_in


def let_in(conn: Connection, t: Tables, d: Dialect, *, key: str, now: datetime) -> list[int]:
    """Let blocked jobs of ``key`` in while it has free slots (its limit grew, a hold expired)."""
    slots = semaphores.lock_key(conn, t, d, key=key, slots=None, now=now)
    return [] if slots is None else _let_in_locked(conn, t, d, key=key, slots=slots, now=now)


def _let_in_locked(conn: Connection, t: Tables, d: Dialect, *, key: str, slots: int, now: datetime) -> list[int]:
    free = slots - semaphores.live_holds(conn, t, key=key, now=now)
    if free <= 0:
        return []
    rows = blocked.next_of(conn, t, d, kind=blocked.CONCURRENCY, key=key, limit=free)
    if not rows:
        return []
    blocked.remove(conn, t, [row.id for row in rows])
    after_slot(conn, t, d, key=key, rows=rows, now=now)
    return [row.job_id for row in rows]


def after_slot(conn: Connection, t: Tables, d: Dialect, *, key: str, rows: Sequence[Any], now: datetime) -> None:
    """Blocked jobs ``rows`` were let in under ``key``: they hold a slot from now, then go on by
    their other limits (a ``Rate``), or ready."""
    found = limits_of(conn, t, [row.job_id for row in rows])
    semaphores.hold(conn, t, key=key, job_ids=[row.job_id for row in rows],
                    duration={row.job_id: (found[row.job_id].concurrency_duration if row.job_id in found else None)
                              or 3600.0 for row in rows}, now=now)
    plain = []
    for row in rows:
        limits = found.get(row.job_id)
        if limits is not None and limits.rate_key:
            admit(conn, t, d, job_id=row.job_id, limits=limits, queue=row.queue_name, priority=row.priority,
                  now=now, has_slot=True)
        else:
            plain.append(row.job_id)
    if plain:
        make_ready(conn, t, d, plain, now)
