"""Ready and scheduled executions: the jobs waiting to be claimed.

A ready row is what a worker claims (``claims``); a scheduled row waits for
its ETA and is promoted to ready by ``dispatch_due``.  Making a job ready
announces it on PostgreSQL (``pg_notify``), from the same transaction, so
idle workers wake on commit and never for a rolled-back write; on a SQLite
file the commit wakes them through sockets beside it (``sqlite_wake``).
"""
from __future__ import annotations

from datetime import datetime
from typing import Sequence

from sqlalchemy import Connection, bindparam, delete, exists, func, insert, literal, select, text

from ..sqlite_wake import wake_at_commit
from . import claim_resume
from .dialects import Dialect
from .gateway import Gateway
from .schema import Tables
from .sql import prebuilt


def ready_channel(t: Tables) -> str:
    """The LISTEN/NOTIFY channel on which ready jobs are announced (per ``table_prefix``)."""
    return f"{t.prefix}ready"


def notify_ready(conn: Connection, t: Tables, d: Dialect, queue: str) -> None:
    """Wake idle workers on commit (PostgreSQL: NOTIFY; a SQLite file: ``sqlite_wake``); a rolled-back
    enqueue sends nothing."""
    if d.notify:
        conn.execute(text("SELECT pg_notify(:channel, :queue)"), {"channel": ready_channel(t), "queue": queue})
    elif d.embedded:
        wake_at_commit(conn)


def make_ready(conn: Connection, t: Tables, d: Dialect, job_ids: Sequence[int], now: datetime) -> None:
    """Insert ready executions for ``job_ids`` (same job row, queue and priority) and announce them."""
    j = t.jobs
    claim_resume.note_made_ready(t)   # (old ids: behind where this process's claims resume)
    conn.execute(insert(t.ready).from_select(
        ["job_id", "queue_name", "priority", "created_at"],
        select(j.c.id, j.c.queue_name, j.c.priority, literal(now, t.ready.c.created_at.type))
        .where(j.c.id.in_(job_ids)),
    ))
    for queue in conn.execute(select(j.c.queue_name).where(j.c.id.in_(job_ids)).distinct()).scalars():
        notify_ready(conn, t, d, queue)


def has_ready(conn: Connection, t: Tables, d: Dialect, *, queues: Sequence[str]) -> bool:
    """A read-only look before a claim, so that idle SQLite polls never take the write lock."""
    def build():
        r = t.ready
        return select(r.c.id).where(r.c.queue_name.in_(bindparam("queues", expanding=True))).limit(1)
    return conn.execute(prebuilt(t, d, "has_ready", build), {"queues": list(queues)}).first() is not None


def ready_count(conn: Connection, t: Tables, *, queue: str) -> int:
    r = t.ready
    return conn.execute(select(func.count()).select_from(r).where(r.c.queue_name == queue)).scalar_one()


def dispatch_due(conn: Connection, t: Tables, d: Dialect, *, now: datetime, limit: int) -> int:
    """Promote up to ``limit`` scheduled executions whose time has come to ready; returns how many."""
    s = t.scheduled
    due = select(s.c.id, s.c.job_id).where(s.c.scheduled_at <= now).order_by(s.c.scheduled_at, s.c.job_id).limit(limit)
    # (Jobs with limits are admitted by their limits instead: ``admission.dispatch_due``.)
    due = due.where(~exists(select(t.job_limits.c.job_id).where(t.job_limits.c.job_id == s.c.job_id)))
    if d.skip_locked:
        due = due.with_for_update(skip_locked=True)
    rows = conn.execute(due).all()
    if not rows:
        return 0
    conn.execute(delete(s).where(s.c.id.in_([row.id for row in rows])))
    make_ready(conn, t, d, [row.job_id for row in rows], now)
    return len(rows)


def scheduled(conn: Connection, t: Tables, *, queue: str | None, limit: int) -> tuple[list, int]:
    """The ``limit`` soonest scheduled (ETA/countdown) jobs, and how many wait in all (of ``queue``).

    Each row: job_id, queue_name, task_name, task_id, priority, scheduled_at.
    """
    s, j = t.scheduled, t.jobs
    q = (select(s.c.job_id, s.c.queue_name, j.c.task_name, j.c.task_id, s.c.priority, s.c.scheduled_at)
         .select_from(s.join(j, j.c.id == s.c.job_id)))
    counted = select(func.count()).select_from(s)
    if queue is not None:
        q, counted = q.where(s.c.queue_name == queue), counted.where(s.c.queue_name == queue)
    rows = list(conn.execute(q.order_by(s.c.scheduled_at, s.c.job_id).limit(limit)).all())
    return rows, conn.execute(counted).scalar_one()


class Executions(Gateway):
    """``store.executions``: ready and scheduled executions."""

    __slots__ = ()

    def has_ready(self, queues: Sequence[str]) -> bool:
        return self.store.read(has_ready, self.t, self.d, queues=queues)

    def ready_count(self, queue: str) -> int:
        return self.store.read(ready_count, self.t, queue=queue)

    def dispatch_due(self, *, now: datetime, limit: int) -> int:
        return self.store.run(dispatch_due, self.t, self.d, now=now, limit=limit)

    def scheduled(self, *, queue: str | None = None, limit: int = 50) -> tuple[list, int]:
        return self.store.read(scheduled, self.t, queue=queue, limit=limit)
