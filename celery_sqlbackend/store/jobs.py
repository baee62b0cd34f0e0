"""The ``jobs`` table: enqueue, retention, and one job's whole story.

A job row carries the message; where it stands (ready, scheduled, claimed,
failed) is the execution row that points at it (``executions``, ``claims``,
``failed``).  A finished job keeps its row (``finished_at``) until
``clear_finished`` deletes it, if the store keeps finished jobs at all.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, insert, select

from .dialects import Dialect
from .executions import notify_ready
from .gateway import Gateway
from .schema import Tables
from .sql import delete_batch


def enqueue(conn: Connection, t: Tables, d: Dialect, *, queue: str, payload: str, task_name: str | None,
            task_id: str | None, priority: int, now: datetime, eta: datetime | None,
            expires_at: datetime | None) -> int:
    """Insert a job and its ready (or, with a future ETA, scheduled) execution; returns the job id."""
    job_id = conn.execute(insert(t.jobs).values(
        queue_name=queue, task_name=task_name, task_id=task_id, priority=priority,
        payload=payload, created_at=now, scheduled_at=eta, expires_at=expires_at,
    )).inserted_primary_key[0]
    if eta is not None and eta > now:
        conn.execute(insert(t.scheduled).values(
            job_id=job_id, queue_name=queue, priority=priority, scheduled_at=eta))
    else:
        conn.execute(insert(t.ready).values(
            job_id=job_id, queue_name=queue, priority=priority, created_at=now))
        notify_ready(conn, t, d, queue)
    return job_id


def clear_finished(conn: Connection, t: Tables, *, before: datetime, limit: int) -> int:
    """Delete one batch of jobs finished before ``before``; callers loop until it returns < ``limit``."""
    j = t.jobs
    return delete_batch(conn, j.c.id, j.c.finished_at.is_not(None), j.c.finished_at < before, limit=limit)


def count_finished(conn: Connection, t: Tables, *, before: datetime) -> int:
    j = t.jobs
    return conn.execute(select(func.count()).select_from(j).where(
        j.c.finished_at.is_not(None), j.c.finished_at < before)).scalar_one()


def detail(conn: Connection, t: Tables, *, job_id: int) -> dict[str, Any] | None:
    """One job with its state (ready, scheduled, claimed, failed or finished) and failure."""
    j, f = t.jobs, t.failed
    row = conn.execute(select(j).where(j.c.id == job_id)).first()
    if row is None:
        return None
    job = dict(row._mapping)
    failure = conn.execute(select(f.c.error_class, f.c.error, f.c.failed_at).where(f.c.job_id == job_id)).first()
    job["state"] = "finished" if job["finished_at"] is not None else "unknown"
    for table, state in ((t.ready, "ready"), (t.scheduled, "scheduled"), (t.claimed, "claimed"), (f, "failed")):
        if conn.execute(select(table.c.job_id).where(table.c.job_id == job_id)).first() is not None:
            job["state"] = state
    job.update(failure._mapping if failure is not None else {"error_class": None, "error": None, "failed_at": None})
    return job


class Jobs(Gateway):
    """``store.jobs``: the statements of this module, each in its own transaction."""

    __slots__ = ()

    def enqueue(self, *, queue: str, payload: str, task_name: str | None, task_id: str | None,
                priority: int, now: datetime, eta: datetime | None = None,
                expires_at: datetime | None = None) -> int:
        return self.store.run(enqueue, self.t, self.d, queue=queue, payload=payload, task_name=task_name,
                              task_id=task_id, priority=priority, now=now, eta=eta, expires_at=expires_at)

    def clear_finished(self, *, before: datetime, limit: int) -> int:
        return self.store.run(clear_finished, self.t, before=before, limit=limit)

    def count_finished(self, *, before: datetime) -> int:
        return self.store.read(count_finished, self.t, before=before)

    def detail(self, job_id: int) -> dict[str, Any] | None:
        return self.store.read(detail, self.t, job_id=job_id)
