"""Blocked executions: jobs waiting on a limit, in the order they will be let in.

``kind`` says what they wait for: "concurrency" (a slot of ``key``: see
``semaphores``) or "rate" (a start of ``key``: see ``rates``).  Like the other
execution tables, a job is blocked iff its row exists; the row goes when the
job is let in (by primary key, after a read in the ``ix_*blocked_next`` order:
priority first, then first in, first out) or with the job row.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Sequence

from sqlalchemy import Connection, delete, func, insert, select

from .dialects import Dialect
from .schema import Tables

CONCURRENCY = "concurrency"
RATE = "rate"


def block(conn: Connection, t: Tables, *, kind: str, key: str, job_id: int, queue: str, priority: int,
          now: datetime) -> None:
    conn.execute(insert(t.blocked).values(job_id=job_id, queue_name=queue, priority=priority, kind=kind, key=key,
                                          created_at=now))


def next_of(conn: Connection, t: Tables, d: Dialect, *, kind: str, key: str, limit: int,
            queues: Sequence[str] | None = None) -> list[Any]:
    """Up to ``limit`` blocked rows of ``key`` (id, job_id, queue_name, priority), next first, locked.

    The caller holds the key's own row lock (``semaphores`` / ``rates``), so
    no other letter-in competes; the row locks keep out a purge meanwhile.
    """
    b = t.blocked
    q = (select(b.c.id, b.c.job_id, b.c.queue_name, b.c.priority)
         .where(b.c.kind == kind, b.c.key == key)
         .order_by(b.c.priority.desc(), b.c.job_id).limit(limit))
    if queues is not None:
        q = q.where(b.c.queue_name.in_(list(queues)))
    if d.skip_locked:
        q = q.with_for_update(skip_locked=True)
    return list(conn.execute(q).all())


def remove(conn: Connection, t: Tables, ids: Sequence[int]) -> None:
    """Delete blocked rows by primary key (they were let in)."""
    if ids:
        conn.execute(delete(t.blocked).where(t.blocked.c.id.in_(sorted(ids))))


def waiting(conn: Connection, t: Tables, *, kind: str, key: str) -> bool:
    b = t.blocked
    return conn.execute(select(b.c.id).where(b.c.kind == kind, b.c.key == key).limit(1)).first() is not None


def counts(conn: Connection, t: Tables, *, limit: int) -> list[Any]:
    """(kind, key, queue_name, jobs) of the most blocked keys, most first (``celery sqlq status``)."""
    b = t.blocked
    n = func.count().label("jobs")
    return list(conn.execute(select(b.c.kind, b.c.key, b.c.queue_name, n).group_by(b.c.kind, b.c.key, b.c.queue_name)
                             .order_by(n.desc(), b.c.kind, b.c.key).limit(limit)).all())


def total(conn: Connection, t: Tables) -> int:
    return conn.execute(select(func.count()).select_from(t.blocked)).scalar_one()
