"""Concurrency slots: one semaphore row per key, one hold per job let in under it.

Taking a slot (``acquire``) and letting blocked jobs in (``release``,
``let_in``) both begin by locking the key's semaphore row (an upsert, or a
locking read), then count the key's live holds: so for any number of
producers and workers, the count they compare with the limit is the one
that stands at their commit.  Locks go in one order everywhere: semaphore
row, holds, blocked rows, then the jobs' executions; several keys in key order.

A hold is *live* until ``expires_at`` (the ``duration`` guard); an expired
hold no longer counts, and maintenance deletes it (``expire``).  Holds of jobs
that finished or failed without a word (the process died between its finish
and the release, a pruner failed it, an operator discarded it) are found by
``sweep``.
"""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Sequence

from sqlalchemy import Connection, delete, exists, func, insert, or_, select
from sqlalchemy.dialects import mysql

from . import blocked
from .dialects import Dialect
from .schema import Tables


def lock_key(conn: Connection, t: Tables, d: Dialect, *, key: str, slots: int | None, now: datetime) -> int | None:
    """Lock ``key``'s semaphore row and return its limit; ``slots`` given: create it or set its limit
    (a limit changed in code applies from the next enqueue).  None: the key has no row."""
    s = t.semaphores
    if slots is None:
        q = select(s.c.slots).where(s.c.key == key)
        return conn.execute(q.with_for_update() if d.skip_locked else q).scalar()
    values = {"key": key, "slots": slots, "updated_at": now}
    if d.insert_on_conflict is not None:
        stmt = d.insert_on_conflict(s).values(**values)
        conn.execute(stmt.on_conflict_do_update(index_elements=[s.c.key], set_={
            "slots": stmt.excluded.slots, "updated_at": stmt.excluded.updated_at}))
    else:   # MySQL / MariaDB
        stmt = mysql.insert(s).values(**values)
        conn.execute(stmt.on_duplicate_key_update(slots=stmt.inserted.slots, updated_at=stmt.inserted.updated_at))
    return slots


def live_holds(conn: Connection, t: Tables, *, key: str, now: datetime) -> int:
    h = t.semaphore_holds
    return conn.execute(select(func.count()).select_from(h).where(h.c.key == key, h.c.expires_at > now)).scalar_one()


def hold(conn: Connection, t: Tables, *, key: str, job_ids: Sequence[int], duration: float | dict[int, float],
         now: datetime) -> None:
    """Record that ``job_ids`` hold a slot of ``key`` (``duration``: seconds, or per job)."""
    if not job_ids:
        return
    per = duration if isinstance(duration, dict) else dict.fromkeys(job_ids, duration)
    conn.execute(insert(t.semaphore_holds), [
        {"job_id": job_id, "key": key, "expires_at": now + timedelta(seconds=per[job_id])} for job_id in job_ids])


def acquire(conn: Connection, t: Tables, d: Dialect, *, key: str, slots: int, duration: float, job_id: int,
            now: datetime) -> bool:
    """Take a slot of ``key`` for ``job_id`` if fewer than ``slots`` are held; False: it must wait."""
    lock_key(conn, t, d, key=key, slots=slots, now=now)
    if live_holds(conn, t, key=key, now=now) >= slots:
        return False
    hold(conn, t, key=key, job_ids=[job_id], duration=duration, now=now)
    return True


def expired(conn: Connection, t: Tables, *, now: datetime, limit: int) -> list[int]:
    """Jobs whose hold is past its ``duration``."""
    h = t.semaphore_holds
    return list(conn.execute(select(h.c.job_id).where(h.c.expires_at <= now).order_by(h.c.expires_at)
                             .limit(limit)).scalars())


def orphaned(conn: Connection, t: Tables, *, limit: int) -> list[int]:
    """Jobs holding a slot that are finished, failed or gone (their release never came)."""
    h, j, f = t.semaphore_holds, t.jobs, t.failed
    gone = ~exists(select(j.c.id).where(j.c.id == h.c.job_id, j.c.finished_at.is_(None)))
    failed = exists(select(f.c.job_id).where(f.c.job_id == h.c.job_id))
    return list(conn.execute(select(h.c.job_id).where(or_(gone, failed)).limit(limit)).scalars())


def starved_keys(conn: Connection, t: Tables, *, now: datetime, limit: int) -> list[str]:
    """Keys with blocked jobs and a free slot (a limit that grew, holds that expired or vanished)."""
    s, h, b = t.semaphores, t.semaphore_holds, t.blocked
    live = (select(func.count()).select_from(h).where(h.c.key == s.c.key, h.c.expires_at > now)
            .scalar_subquery())
    waiting = exists(select(b.c.id).where(b.c.kind == blocked.CONCURRENCY, b.c.key == s.c.key))
    return list(conn.execute(select(s.c.key).where(waiting, live < s.c.slots).order_by(s.c.key)
                             .limit(limit)).scalars())


def forget_idle(conn: Connection, t: Tables, *, before: datetime, limit: int) -> int:
    """Delete semaphore rows of keys nobody holds or waits on, untouched since ``before``."""
    s, h, b = t.semaphores, t.semaphore_holds, t.blocked
    keys = list(conn.execute(select(s.c.key).where(
        s.c.updated_at < before, ~exists(select(h.c.job_id).where(h.c.key == s.c.key)),
        ~exists(select(b.c.id).where(b.c.kind == blocked.CONCURRENCY, b.c.key == s.c.key))).limit(limit)).scalars())
    if keys:
        conn.execute(delete(s).where(s.c.key.in_(keys), ~exists(select(h.c.job_id).where(h.c.key == s.c.key)),
                                     s.c.updated_at < before))
    return len(keys)


def holds_by_key(conn: Connection, t: Tables, *, now: datetime, limit: int) -> list[Any]:
    """(key, slots, live holds) of the busiest keys (``celery sqlq status``)."""
    s, h = t.semaphores, t.semaphore_holds
    n = func.count(h.c.job_id).label("held")
    live = (h.c.key == s.c.key) & (h.c.expires_at > now)
    return list(conn.execute(select(s.c.key, s.c.slots, n).select_from(s.outerjoin(h, live))
                             .group_by(s.c.key, s.c.slots)
                             .order_by(n.desc(), s.c.key).limit(limit)).all())


def in_use(conn: Connection, t: Tables) -> bool:
    """Any job with limits, or slot held, at all: whether the workers' limit chores have anything to do.
    (Every limited job has its ``job_limits`` row while it exists; a hold may outlive its job.)"""
    return any(conn.execute(select(column).limit(1)).first() is not None
               for column in (t.job_limits.c.job_id, t.semaphore_holds.c.job_id))


