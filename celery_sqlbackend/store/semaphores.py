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

from sqlalchemy import Connection, delete, exists, func, insert, or_, select, update
from sqlalchemy.dialects import mysql

from . import blocked
from .dialects import Dialect
from .gateway import Gateway
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
        slots = lock_key(conn, t, d, key=key, slots=None, now=now)
        conn.execute(delete(h).where(h.c.job_id.in_(sorted(by_key[key])), h.c.key == key))
        if slots is not None:
            let_in += _let_in_locked(conn, t, d, key=key, slots=slots, now=now)
    return let_in


def let_in(conn: Connection, t: Tables, d: Dialect, *, key: str, now: datetime) -> list[int]:
    """Let blocked jobs of ``key`` in while it has free slots (its limit grew, a hold expired)."""
    slots = lock_key(conn, t, d, key=key, slots=None, now=now)
    return [] if slots is None else _let_in_locked(conn, t, d, key=key, slots=slots, now=now)


def _let_in_locked(conn: Connection, t: Tables, d: Dialect, *, key: str, slots: int, now: datetime) -> list[int]:
    from .admission import after_slot   # (admission routes a job by all its limits; it imports this module)
    free = slots - live_holds(conn, t, key=key, now=now)
    if free <= 0:
        return []
    rows = blocked.next_of(conn, t, d, kind=blocked.CONCURRENCY, key=key, limit=free)
    if not rows:
        return []
    blocked.remove(conn, t, [row.id for row in rows])
    after_slot(conn, t, d, key=key, rows=rows, now=now)
    return [row.job_id for row in rows]


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
    """Any semaphore or rate key at all: whether the workers' limit chores have anything to do."""
    return (conn.execute(select(t.semaphores.c.key).limit(1)).first() is not None
            or conn.execute(select(t.rate_keys.c.key).limit(1)).first() is not None)


class Semaphores(Gateway):
    """``store.semaphores``: releasing slots and the chores of ``Concurrency`` (taking a slot is part of
    the enqueue: ``admission``)."""

    __slots__ = ()

    def release(self, *, job_ids: Sequence[int], now: datetime) -> list[int]:
        return self.store.run(release, self.t, self.d, job_ids=job_ids, now=now)

    def let_in(self, *, key: str, now: datetime) -> list[int]:
        return self.store.run(let_in, self.t, self.d, key=key, now=now)

    def expired(self, *, now: datetime, limit: int) -> list[int]:
        return self.store.read(expired, self.t, now=now, limit=limit)

    def orphaned(self, *, limit: int) -> list[int]:
        return self.store.read(orphaned, self.t, limit=limit)

    def starved_keys(self, *, now: datetime, limit: int) -> list[str]:
        return self.store.read(starved_keys, self.t, now=now, limit=limit)

    def forget_idle(self, *, before: datetime, limit: int) -> int:
        return self.store.run(forget_idle, self.t, before=before, limit=limit)

    def holds_by_key(self, *, now: datetime, limit: int = 20) -> list[Any]:
        return self.store.read(holds_by_key, self.t, now=now, limit=limit)

    def in_use(self) -> bool:
        return self.store.read(in_use, self.t)
