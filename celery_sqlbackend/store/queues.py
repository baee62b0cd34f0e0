"""Queues as an operator sees them: pause, resume, purge, trim, and their counts.

A queue has no row of its own: it is the ``queue_name`` its executions carry.
A paused queue has a row in ``pauses``, which the claim statement skips.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Sequence

from sqlalchemy import Connection, delete, func, insert, select

from .dialects import Dialect
from .executions import notify_ready
from .gateway import Gateway
from .schema import Tables
from .sql import chunks


def pause(conn: Connection, t: Tables, *, queue: str, now: datetime) -> None:
    if conn.execute(select(t.pauses.c.queue_name).where(t.pauses.c.queue_name == queue)).first() is None:
        conn.execute(insert(t.pauses).values(queue_name=queue, created_at=now))


def resume(conn: Connection, t: Tables, d: Dialect, *, queue: str) -> None:
    """Unpause ``queue`` and announce its waiting jobs as a new job would, so idle workers
    that sleep until a NOTIFY (PostgreSQL) start them now rather than at their next idle poll."""
    if conn.execute(delete(t.pauses).where(t.pauses.c.queue_name == queue)).rowcount:
        notify_ready(conn, t, d, queue)


def paused(conn: Connection, t: Tables) -> list[str]:
    return sorted(conn.execute(select(t.pauses.c.queue_name)).scalars())


def purge(conn: Connection, t: Tables, *, queue: str) -> int:
    """Delete every waiting (ready, scheduled or blocked on a limit) job of ``queue``; claimed ones are
    left to finish.  (Slots the deleted jobs held come back with the next limit chores.)"""
    j = t.jobs
    waiting = select(t.ready.c.job_id).where(t.ready.c.queue_name == queue).union_all(
        select(t.scheduled.c.job_id).where(t.scheduled.c.queue_name == queue),
        select(t.blocked.c.job_id).where(t.blocked.c.queue_name == queue))
    job_ids = list(conn.execute(waiting).scalars())
    for chunk in chunks(job_ids, 500):
        conn.execute(delete(t.ready).where(t.ready.c.job_id.in_(chunk)))
        conn.execute(delete(t.scheduled).where(t.scheduled.c.job_id.in_(chunk)))
        conn.execute(delete(t.blocked).where(t.blocked.c.job_id.in_(chunk)))
        conn.execute(delete(j).where(j.c.id.in_(chunk)))
    return len(job_ids)


def drop_waiting(conn: Connection, t: Tables, *, queues: Sequence[str], before: datetime | None,
                 now: datetime, limit: int) -> int:
    """Delete up to ``limit`` ready jobs of ``queues``: all (``before`` None), or stale/expired ones."""
    r, j = t.ready, t.jobs
    q = select(r.c.job_id).join(j, j.c.id == r.c.job_id).where(r.c.queue_name.in_(list(queues)))
    if before is not None:
        q = q.where((r.c.created_at < before) | (j.c.expires_at < now))
    ids = list(conn.execute(q.limit(limit)).scalars())
    if ids:
        conn.execute(delete(r).where(r.c.job_id.in_(ids)))
        conn.execute(delete(j).where(j.c.id.in_(ids)))
    return len(ids)


def trim_backlog(conn: Connection, t: Tables, *, queue: str, keep: int, limit: int) -> int:
    """Delete the oldest ready jobs of ``queue`` beyond the newest ``keep`` (at most ``limit``)."""
    r = t.ready
    waiting = conn.execute(select(func.count()).select_from(r).where(r.c.queue_name == queue)).scalar_one()
    excess = min(waiting - keep, limit)
    if excess <= 0:
        return 0
    ids = list(conn.execute(select(r.c.job_id).where(r.c.queue_name == queue)
                            .order_by(r.c.job_id).limit(excess)).scalars())
    conn.execute(delete(r).where(r.c.job_id.in_(ids)))
    conn.execute(delete(t.jobs).where(t.jobs.c.id.in_(ids)))
    return len(ids)


def stats(conn: Connection, t: Tables) -> dict[str, dict[str, Any]]:
    """Per queue: ready, scheduled, claimed and failed counts, oldest ready time, paused."""
    found: dict[str, dict[str, Any]] = {}

    def row(queue: str) -> dict[str, Any]:
        return found.setdefault(queue, {"ready": 0, "scheduled": 0, "claimed": 0, "failed": 0,
                                        "oldest_ready_at": None, "paused": False})

    r = t.ready
    for queue, n, oldest in conn.execute(
            select(r.c.queue_name, func.count(), func.min(r.c.created_at)).group_by(r.c.queue_name)):
        row(queue).update(ready=n, oldest_ready_at=oldest)
    for table, key in ((t.scheduled, "scheduled"), (t.claimed, "claimed"), (t.failed, "failed")):
        for queue, n in conn.execute(select(table.c.queue_name, func.count()).group_by(table.c.queue_name)):
            row(queue)[key] = n
    for queue in conn.execute(select(t.pauses.c.queue_name)).scalars():
        row(queue)["paused"] = True
    return found


class Queues(Gateway):
    """``store.queues``: pause, resume, purge, trim and count queues."""

    __slots__ = ()

    def pause(self, queue: str, *, now: datetime) -> None:
        self.store.run(pause, self.t, queue=queue, now=now)

    def resume(self, queue: str) -> None:
        self.store.run(resume, self.t, self.d, queue=queue)

    def paused(self) -> list[str]:
        return self.store.read(paused, self.t)

    def purge(self, queue: str) -> int:
        return self.store.run(purge, self.t, queue=queue)

    def drop_waiting(self, *, queues: Sequence[str], before: datetime | None, now: datetime, limit: int) -> int:
        return self.store.run(drop_waiting, self.t, queues=queues, before=before, now=now, limit=limit)

    def trim_backlog(self, *, queue: str, keep: int, limit: int) -> int:
        return self.store.run(trim_backlog, self.t, queue=queue, keep=keep, limit=limit)

    def stats(self) -> dict[str, dict[str, Any]]:
        return self.store.read(stats, self.t)
