"""The ``jobs`` table: enqueue, retention, and one job's whole story.

A job row carries the message; where it stands (ready, scheduled, claimed,
failed) is the execution row that points at it (``executions``, ``claims``,
``failed``).  A finished job keeps its row (``finished_at``) until
``clear_finished`` deletes it, if the store keeps finished jobs at all.
"""
from __future__ import annotations

from dataclasses import dataclass

from datetime import datetime
from typing import Any, NamedTuple, Sequence

from sqlalchemy import Connection, bindparam, delete, func, insert, select

from . import admission, pg_bulk, unique_keys
from .admission import JobLimits
from .dialects import Dialect
from .engine import get_autocommit_engine
from .executions import notify_ready, ready_channel
from .gateway import Gateway
from .schema import Tables
from .sql import delete_batch, prebuilt
from .unique_keys import UniqueKey


@dataclass(frozen=True, slots=True)
class NewJob:
    """A message on its way into the store: its row, its execution, and its unique key if any."""
    queue: str
    payload: str
    task_name: str | None
    task_id: str | None
    priority: int
    created_at: datetime
    eta: datetime | None = None
    expires_at: datetime | None = None
    unique: UniqueKey | None = None
    limits: JobLimits | None = None

    @property
    def scheduled(self) -> bool:
        """A future ETA: the job waits as a scheduled execution, not a ready one."""
        return self.eta is not None and self.eta > self.created_at

    def row(self) -> dict[str, Any]:
        return {"queue_name": self.queue, "task_name": self.task_name, "task_id": self.task_id,
                "priority": self.priority, "payload": self.payload, "created_at": self.created_at,
                "scheduled_at": self.eta, "expires_at": self.expires_at, "deliveries": 0, "releases": 0}


class Enqueued(NamedTuple):
    """What an enqueue did: the new job's id, or (a unique key was held) the holding task's id."""
    job_id: int | None
    holder: str | None = None


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


def insert_one(conn: Connection, t: Tables, d: Dialect, job: NewJob) -> Enqueued:
    """Insert ``job`` with its unique key (if it has one) and its execution, in ``conn``'s transaction.

    A held key leaves nothing behind: the job row, written first so that the
    key can name it, is deleted again in the same transaction.
    """
    job_id = conn.execute(insert(t.jobs).values(**job.row())).inserted_primary_key[0]
    if job.unique is not None and not unique_keys.take(conn, t, d, key=job.unique, task_id=job.task_id or "",
                                                       job_id=job_id, now=job.created_at):
        conn.execute(delete(t.jobs).where(t.jobs.c.id == job_id))
        return Enqueued(None, unique_keys.holder(conn, t, d, key=job.unique.key))
    if job.limits is not None:    # ready, or blocked on a limit (``admission``)
        admission.enqueue(conn, t, d, job_id=job_id, limits=job.limits, queue=job.queue, priority=job.priority,
                          now=job.created_at, scheduled=job.scheduled)
        if job.scheduled:
            conn.execute(insert(t.scheduled).values(job_id=job_id, queue_name=job.queue, priority=job.priority,
                                                    scheduled_at=job.eta))
        return Enqueued(job_id)
    if job.scheduled:
        conn.execute(insert(t.scheduled).values(job_id=job_id, queue_name=job.queue, priority=job.priority,
                                                scheduled_at=job.eta))
    else:
        conn.execute(insert(t.ready).values(job_id=job_id, queue_name=job.queue, priority=job.priority,
                                            created_at=job.created_at))
        notify_ready(conn, t, d, job.queue)
    return Enqueued(job_id)


def insert_one_statement(conn: Connection, t: Tables, d: Dialect, job: NewJob) -> int:
    """``insert_one`` without a unique key as ONE statement (PostgreSQL), for autocommit: one round trip.

        WITH job AS (INSERT INTO jobs … RETURNING id, queue_name, priority, created_at, scheduled_at),
             execution AS (INSERT INTO ready_executions (…) SELECT … FROM job)   -- or scheduled_executions
        SELECT job.id, pg_notify(:channel, job.queue_name) FROM job               -- (ready only)
    """
    name = "enqueue_scheduled" if job.scheduled else "enqueue_ready"
    stmt = prebuilt(t, d, name, lambda: _one_statement(t, job.scheduled))
    return conn.execute(stmt, {**job.row(), "channel": ready_channel(t)}).scalar_one()


def _one_statement(t: Tables, scheduled: bool):
    j = t.jobs
    values = {c: bindparam(c, type_=j.c[c].type) for c in ("queue_name", "task_name", "task_id", "priority",
                                                          "payload", "created_at", "scheduled_at", "expires_at",
                                                          "deliveries", "releases")}
    job = insert(j).values(**values).returning(j.c.id, j.c.queue_name, j.c.priority, j.c.created_at,
                                                j.c.scheduled_at).cte("job")
    if scheduled:
        execution = insert(t.scheduled).from_select(
            ["job_id", "queue_name", "priority", "scheduled_at"],
            select(job.c.id, job.c.queue_name, job.c.priority, job.c.scheduled_at)).cte("execution")
        return select(job.c.id).add_cte(execution)
    execution = insert(t.ready).from_select(
        ["job_id", "queue_name", "priority", "created_at"],
        select(job.c.id, job.c.queue_name, job.c.priority, job.c.created_at)).cte("execution")
    return select(job.c.id, func.pg_notify(bindparam("channel"), job.c.queue_name)).add_cte(execution)


class Placed(NamedTuple):
    """What a written job's execution needs (no payload): kept while a batch stages its jobs."""
    job_id: int
    queue: str
    priority: int
    created_at: datetime
    eta: datetime | None

    @property
    def scheduled(self) -> bool:
        return self.eta is not None and self.eta > self.created_at


def insert_many(conn: Connection, t: Tables, d: Dialect, jobs: Sequence[NewJob]) -> None:
    """Jobs without unique keys in a few multi-row INSERTs: jobs, then their ready and scheduled
    executions; one NOTIFY per queue made ready.  (PostgreSQL: one statement, ``pg_bulk``.)"""
    if d.name == "postgresql":
        pg_bulk.insert_many(conn, t, d, jobs)
        return
    insert_executions(conn, t, d, insert_rows(conn, t, d, jobs))


def insert_rows(conn: Connection, t: Tables, d: Dialect, jobs: Sequence[NewJob]) -> list[Placed]:
    """The job rows alone, in multi-row INSERTs: invisible to workers until ``insert_executions``."""
    if not jobs:
        return []
    j = t.jobs
    rows = [job.row() for job in jobs]
    if d.embedded:
        # SQLite: the driver's executemany (no round trips to save); this transaction is
        # the only writer, so the rows got the next ids in order (max(rowid) + 1 each).
        conn.execute(insert(j), rows)
        last = conn.exec_driver_sql("SELECT last_insert_rowid()").scalar_one()
        ids = list(range(last - len(rows) + 1, last + 1))
    elif conn.dialect.insert_executemany_returning_sort_by_parameter_order:
        # SQLAlchemy's "insertmanyvalues": multi-row INSERT … RETURNING, pages of 1,000 rows.
        ids = list(conn.execute(insert(j).returning(j.c.id, sort_by_parameter_order=True), rows).scalars())
    else:   # (MySQL: no RETURNING)
        ids = [conn.execute(insert(j).values(**row)).inserted_primary_key[0] for row in rows]
    return [Placed(i, job.queue, job.priority, job.created_at, job.eta) for i, job in zip(ids, jobs)]


def insert_executions(conn: Connection, t: Tables, d: Dialect, placed: Sequence[Placed]) -> None:
    """The ready and scheduled executions of written jobs: from here workers see them."""
    ready = [{"job_id": p.job_id, "queue_name": p.queue, "priority": p.priority, "created_at": p.created_at}
             for p in placed if not p.scheduled]
    scheduled = [{"job_id": p.job_id, "queue_name": p.queue, "priority": p.priority, "scheduled_at": p.eta}
                 for p in placed if p.scheduled]
    if ready:
        _insert_rows(conn, d, t.ready, ready)
        for queue in sorted({row["queue_name"] for row in ready}):
            notify_ready(conn, t, d, queue)
    if scheduled:
        _insert_rows(conn, d, t.scheduled, scheduled)


def place_range(conn: Connection, t: Tables, d: Dialect, first: int, last: int) -> None:
    """The executions of the job rows ``first``..``last`` written without them (``insert_rows``), from
    the rows themselves: ``INSERT … SELECT``, so that a staged batch keeps nothing but id ranges."""
    j = t.jobs
    rows = (j.c.id >= first, j.c.id <= last)
    later = j.c.scheduled_at.is_not(None) & (j.c.scheduled_at > j.c.created_at)   # (``NewJob.scheduled``)
    conn.execute(insert(t.ready).from_select(
        ["job_id", "queue_name", "priority", "created_at"],
        select(j.c.id, j.c.queue_name, j.c.priority, j.c.created_at).where(*rows, ~later).order_by(j.c.id)))
    conn.execute(insert(t.scheduled).from_select(
        ["job_id", "queue_name", "priority", "scheduled_at"],
        select(j.c.id, j.c.queue_name, j.c.priority, j.c.scheduled_at).where(*rows, later).order_by(j.c.id)))
    for queue in conn.execute(select(j.c.queue_name).where(*rows, ~later).distinct()).scalars().all():
        notify_ready(conn, t, d, queue)


def delete_range(conn: Connection, t: Tables, first: int, last: int) -> None:
    """Delete the job rows ``first``..``last`` written without executions (a staged batch that failed)."""
    conn.execute(delete(t.jobs).where(t.jobs.c.id >= first, t.jobs.c.id <= last))


def _insert_rows(conn: Connection, d: Dialect, table: Any, rows: list[dict[str, Any]]) -> None:
    """Multi-row INSERTs of ``rows`` from one compiled statement, whatever their number.

    An executemany with RETURNING is what SQLAlchemy sends as pages of
    multi-row ``INSERT … VALUES (…), (…)`` ("insertmanyvalues"); without it
    the driver would run one INSERT per row.  (SQLite: the driver's executemany, one
    prepared statement in this process; MySQL: PyMySQL's, which it sends as multi-row INSERTs.)
    """
    if conn.dialect.insert_executemany_returning and not d.embedded:
        conn.execute(insert(table).returning(table.c.id), rows).close()
    else:
        conn.execute(insert(table), rows)


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
    if job["state"] == "claimed":   # (the delivery under way is counted when it ends: ``deliveries``)
        job["deliveries"] += 1
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

    def add(self, job: NewJob) -> Enqueued:
        """Enqueue one job in a transaction of its own; on PostgreSQL, without a unique key, one round trip
        (``insert_one_statement`` in autocommit, on a pool that does not ping: ``get_autocommit_engine``)."""
        if job.unique is None and job.limits is None and self.d.dml_cte and self.d.autocommit_single:
            self.store.ensure_schema()
            with get_autocommit_engine(self.store.url).connect() as conn:
                return Enqueued(insert_one_statement(conn, self.t, self.d, job))
        return self.store.run(insert_one, self.t, self.d, job)

    def clear_finished(self, *, before: datetime, limit: int) -> int:
        return self.store.run(clear_finished, self.t, before=before, limit=limit)

    def count_finished(self, *, before: datetime) -> int:
        return self.store.read(count_finished, self.t, before=before)

    def detail(self, job_id: int) -> dict[str, Any] | None:
        return self.store.read(detail, self.t, job_id=job_id)
