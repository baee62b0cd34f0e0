"""Where a limited job goes when it may run: ready, or blocked on a limit.

A job's limits (``JobLimits``, from its ``sqlq_limits`` header) are kept in
``job_limits`` while the job exists.  The job is *admitted* when it becomes
runnable: at enqueue, or when its ETA comes (``dispatch_due`` hands the
limited ones here).  Admission checks its limits in order:

1. ``Concurrency``: take a slot of the key (``semaphores.acquire``), or wait
   blocked on it; a released slot lets it in later (``after_slot``);
2. ``Rate``: wait blocked on the key until a worker claims it within the rate
   (``rates.claim``): a rate is counted when a job starts, not before;
3. otherwise (or then) ready, like any job.

Jobs without limits never come here: enqueue, claim and finish are unchanged for them.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Sequence

from sqlalchemy import Connection, insert, select

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


def admit_due(conn: Connection, t: Tables, d: Dialect, *, job_ids: Sequence[int], now: datetime) -> set[int]:
    """Admit those of ``job_ids`` (scheduled jobs whose time came) that have limits; returns them.
    (One indexed read per batch of due jobs; the rest the caller makes ready as before.)"""
    found = limits_of(conn, t, job_ids)
    if not found:
        return set()
    j = t.jobs
    rows = conn.execute(select(j.c.id, j.c.queue_name, j.c.priority).where(j.c.id.in_(sorted(found)))).all()
    for row in sorted(rows, key=lambda r: r.id):
        admit(conn, t, d, job_id=row.id, limits=found[row.id], queue=row.queue_name, priority=row.priority, now=now)
    return set(found)


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
