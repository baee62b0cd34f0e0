"""Failed executions: jobs whose task raised (``record_task_failures``), were rejected, or were lost with their worker.

A failed row keeps the job (and so its task id) with the error's class name
and text, until an operator retries it (failed → ready, same job) or
discards it (both rows deleted).  Listing is keyset-paged by job id.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Sequence

from sqlalchemy import Connection, Row, delete, func, literal, select, update, insert

from ..errors import STORE_DECISIONS
from .dialects import Dialect
from .executions import make_ready
from .gateway import Gateway
from .schema import Tables


def insert_failed(conn: Connection, t: Tables, job_ids: Sequence[int], error_class: str, error: str,
                  now: datetime) -> None:
    """Record ``job_ids`` as failed with ``error_class`` (an ``errors`` class name) and ``error``."""
    j = t.jobs
    conn.execute(insert(t.failed).from_select(
        ["job_id", "queue_name", "error_class", "error", "failed_at"],
        select(j.c.id, j.c.queue_name, literal(error_class), literal(error),
               literal(now, t.failed.c.failed_at.type))
        .where(j.c.id.in_(job_ids)),
    ))
    # A failed job no longer holds its unique key (a time-limited one is not the job's).
    conn.execute(delete(t.unique_keys).where(t.unique_keys.c.job_id.in_(job_ids)))


def _filtered(q: Any, t: Tables, *, queue: str | None, task_name: str | None, error_class: str | None,
              failed_before: datetime | None) -> Any:
    """The filters shared by listing and counting failed jobs (``failed`` joined to ``jobs``)."""
    f, j = t.failed, t.jobs
    if queue is not None:
        q = q.where(f.c.queue_name == queue)
    if task_name is not None:
        q = q.where(j.c.task_name == task_name)
    if error_class is not None:
        q = q.where(f.c.error_class == error_class)
    if failed_before is not None:
        q = q.where(f.c.failed_at < failed_before)
    return q


def list_failed(conn: Connection, t: Tables, *, queue: str | None = None, task_name: str | None = None,
                error_class: str | None = None, failed_before: datetime | None = None,
                after_job_id: int | None = None, limit: int | None = None) -> list[Row]:
    """Failed jobs with their error, oldest job first, filtered; keyset-paged by ``after_job_id``.

    Each row: job_id, task_id, task_name, queue_name, error_class, error,
    failed_at, created_at, deliveries, releases.
    """
    f, j = t.failed, t.jobs
    q = (select(f.c.job_id, j.c.task_id, j.c.task_name, f.c.queue_name, f.c.error_class, f.c.error,
                f.c.failed_at, j.c.created_at, j.c.deliveries, j.c.releases)
         .select_from(f.join(j, j.c.id == f.c.job_id)))
    q = _filtered(q, t, queue=queue, task_name=task_name, error_class=error_class, failed_before=failed_before)
    if after_job_id is not None:
        q = q.where(f.c.job_id > after_job_id)
    q = q.order_by(f.c.job_id)
    if limit is not None:
        q = q.limit(limit)
    return list(conn.execute(q).all())


def count_failed(conn: Connection, t: Tables, *, queue: str | None = None, task_name: str | None = None,
                 error_class: str | None = None, failed_before: datetime | None = None) -> int:
    """How many failed jobs match (the total behind a progress bar)."""
    f, j = t.failed, t.jobs
    q = select(func.count()).select_from(f.join(j, j.c.id == f.c.job_id))
    q = _filtered(q, t, queue=queue, task_name=task_name, error_class=error_class, failed_before=failed_before)
    return conn.execute(q).scalar_one()


def failed_messages(conn: Connection, t: Tables, *, job_ids: Sequence[int]) -> list[Row]:
    """For recording results: job_id, task_id, task_name, payload, error_class, error of failed ``job_ids``."""
    f, j = t.failed, t.jobs
    return list(conn.execute(
        select(f.c.job_id, j.c.task_id, j.c.task_name, j.c.payload, f.c.error_class, f.c.error)
        .select_from(f.join(j, j.c.id == f.c.job_id)).where(f.c.job_id.in_(list(job_ids))).order_by(f.c.job_id)).all())


def failed_by_task(conn: Connection, t: Tables, *, job_id: int) -> bool:
    """Is ``job_id`` failed with its task's own exception (not by one of the store's decisions)?"""
    f = t.failed
    return conn.execute(select(f.c.job_id).where(
        f.c.job_id == job_id, f.c.error_class.not_in(list(STORE_DECISIONS)))).first() is not None


def retry_failed(conn: Connection, t: Tables, d: Dialect, *, job_ids: Sequence[int], now: datetime) -> int:
    """Failed → ready, with the same job (and so the same task id); returns how many."""
    f = t.failed
    if d.delete_returning:
        # Two concurrent retries of one job: only the one whose DELETE took the row re-queues it.
        taken = list(conn.execute(delete(f).where(f.c.job_id.in_(job_ids)).returning(f.c.job_id)).scalars())
    else:
        taken = list(conn.execute(select(f.c.job_id).where(f.c.job_id.in_(job_ids)).with_for_update()).scalars())
        if taken:
            conn.execute(delete(f).where(f.c.job_id.in_(taken)))
    if not taken:
        return 0
    conn.execute(update(t.jobs).where(t.jobs.c.id.in_(taken)).values(releases=0))
    make_ready(conn, t, d, taken, now)
    return len(taken)


def discard_failed(conn: Connection, t: Tables, *, job_ids: Sequence[int]) -> int:
    """Delete failed jobs (their failed rows and job rows); returns how many."""
    f = t.failed
    taken = list(conn.execute(select(f.c.job_id).where(f.c.job_id.in_(job_ids))).scalars())
    if taken:
        conn.execute(delete(f).where(f.c.job_id.in_(taken)))
        conn.execute(delete(t.jobs).where(t.jobs.c.id.in_(taken)))
    return len(taken)


class Failed(Gateway):
    """``store.failed``: list, count, retry and discard failed jobs."""

    __slots__ = ()

    def list(self, *, queue: str | None = None, task_name: str | None = None, error_class: str | None = None,
             failed_before: datetime | None = None, after_job_id: int | None = None,
             limit: int | None = None) -> list[Row]:
        return self.store.read(list_failed, self.t, queue=queue, task_name=task_name, error_class=error_class,
                               failed_before=failed_before, after_job_id=after_job_id, limit=limit)

    def count(self, *, queue: str | None = None, task_name: str | None = None, error_class: str | None = None,
              failed_before: datetime | None = None) -> int:
        return self.store.read(count_failed, self.t, queue=queue, task_name=task_name, error_class=error_class,
                               failed_before=failed_before)

    def messages(self, *, job_ids: Sequence[int]) -> list[Row]:
        return self.store.read(failed_messages, self.t, job_ids=job_ids)

    def failed_by_task(self, *, job_id: int) -> bool:
        return self.store.read(failed_by_task, self.t, job_id=job_id)

    def retry(self, *, job_ids: Sequence[int], now: datetime) -> int:
        return self.store.run(retry_failed, self.t, self.d, job_ids=job_ids, now=now)

    def discard(self, *, job_ids: Sequence[int]) -> int:
        return self.store.run(discard_failed, self.t, job_ids=job_ids)
