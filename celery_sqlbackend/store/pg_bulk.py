"""Many jobs in ONE statement on PostgreSQL, and a pipeline that sends them while the next are built.

Why one statement: a multi-row ``VALUES`` list of 500 rows is 5,000
placeholders, and psycopg parses such a query text again on every execution
(too long for its cache), which took longer than PostgreSQL took to insert the
rows.  Arrays of columns keep the text short, but psycopg escapes every quote of
every payload in Python to write an array.  So the rows travel as one JSON
array of objects, written by Python's C encoder and read by PostgreSQL's::

    WITH job AS (INSERT INTO jobs (…) SELECT … FROM json_to_recordset(:rows) AS rows(n INTEGER, …)
                 ORDER BY n RETURNING id, queue_name, priority, created_at, scheduled_at),
         ready AS (INSERT INTO ready_executions … SELECT … FROM job WHERE <not scheduled> ORDER BY id),
         scheduled AS (INSERT INTO scheduled_executions … SELECT … FROM job WHERE <scheduled> ORDER BY id)
    SELECT pg_notify(:channel, queue_name) FROM (SELECT DISTINCT queue_name FROM job WHERE <not scheduled>)

The jobs get their ids in the list's order (``ORDER BY n``), and the
NOTIFY of each queue made ready is delivered at commit, as for one job.

Why a pipeline (``ChunkPipeline``): a large batch (a group, ``enqueue_many``)
alternates between building a chunk of messages in Python and PostgreSQL
inserting it.  In psycopg's pipeline mode a statement is sent without waiting
for its result, so the server inserts one chunk while Python builds the next,
on the other core, with no thread and no GIL to share.  The batch ends the
pipeline (which raises the first error any of its statements met) before it
commits.  Only on psycopg 3 and a direct connection or a session pool: behind
a transaction pooler the batch writes statement by statement, as before.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Sequence

from sqlalchemy import JSON, Connection, Integer, Text, bindparam, cast, column, func, insert, literal_column, select

from .dialects import Dialect
from .executions import ready_channel
from .schema import Tables
from .sql import prebuilt

if TYPE_CHECKING:
    from .jobs import NewJob

_COLUMNS = ("queue_name", "task_name", "task_id", "priority", "payload", "created_at", "scheduled_at",
            "expires_at")


def insert_many(conn: Connection, t: Tables, d: Dialect, jobs: Sequence["NewJob"]) -> None:
    """The jobs and their executions, in ``conn``'s transaction, in one statement."""
    if jobs:
        conn.execute(prebuilt(t, d, "enqueue_many", lambda: _statement(t)), params(t, jobs))


def params(t: Tables, jobs: Sequence["NewJob"]) -> dict[str, Any]:
    rows = json.dumps([{"n": n, "queue_name": job.queue, "task_name": job.task_name, "task_id": job.task_id,
                        "priority": job.priority, "payload": job.payload, "created_at": job.created_at.isoformat(),
                        "scheduled_at": None if job.eta is None else job.eta.isoformat(),
                        "expires_at": None if job.expires_at is None else job.expires_at.isoformat()}
                       for n, job in enumerate(jobs)])
    return {"rows": rows, "channel": ready_channel(t)}


def _statement(t: Tables):
    j = t.jobs
    rows = (func.json_to_recordset(cast(bindparam("rows", type_=Text()), JSON()))
            .table_valued(column("n", Integer()), *(column(name, j.c[name].type) for name in _COLUMNS))
            .render_derived(name="rows", with_types=True))
    source = select(*(rows.c[name] for name in _COLUMNS), literal_column("0"), literal_column("0")).order_by(rows.c.n)
    job = (insert(j).from_select([*_COLUMNS, "deliveries", "releases"], source)
           .returning(j.c.id, j.c.queue_name, j.c.priority, j.c.created_at, j.c.scheduled_at).cte("job"))
    later = job.c.scheduled_at.is_not(None) & (job.c.scheduled_at > job.c.created_at)   # (``NewJob.scheduled``)
    ready = insert(t.ready).from_select(
        ["job_id", "queue_name", "priority", "created_at"],
        select(job.c.id, job.c.queue_name, job.c.priority, job.c.created_at).where(~later).order_by(job.c.id))
    scheduled = insert(t.scheduled).from_select(
        ["job_id", "queue_name", "priority", "scheduled_at"],
        select(job.c.id, job.c.queue_name, job.c.priority, job.c.scheduled_at).where(later).order_by(job.c.id))
    queues = select(job.c.queue_name).where(~later).distinct().subquery("queues")
    return (select(func.pg_notify(bindparam("channel"), queues.c.queue_name))
            .add_cte(ready.cte("ready"), scheduled.cte("scheduled")))


class ChunkPipeline:
    """``insert_many`` for every chunk of a batch on one connection, each sent without waiting for the
    last (module doc).  ``finish`` before anything else uses the connection."""

    def __init__(self, conn: Connection, t: Tables, d: Dialect) -> None:
        self.t = t
        key = ("enqueue_many_text", d.name)     # (the statement's text, compiled once per store)
        if key not in t.prebuilt:
            t.prebuilt[key] = str(prebuilt(t, d, "enqueue_many", lambda: _statement(t)).compile(dialect=conn.dialect))
        self._sql: str = t.prebuilt[key]
        driver = conn.connection.driver_connection
        conn.exec_driver_sql("SELECT 1")     # (the transaction begins before the pipeline: BEGIN is not queued)
        self._pipeline = driver.pipeline()
        self._pipeline.__enter__()
        self._cursor = driver.cursor()

    @staticmethod
    def usable(conn: Connection, d: Dialect, pool_mode: str) -> bool:
        """psycopg 3 on a direct connection or a session pool (module doc)."""
        return (d.name == "postgresql" and pool_mode == "session"
                and hasattr(conn.connection.driver_connection, "pipeline"))

    def send(self, jobs: Sequence["NewJob"]) -> None:
        if jobs:
            self._cursor.execute(self._sql, params(self.t, jobs))

    def finish(self) -> None:
        """Wait for every statement sent; raises the first error one of them met."""
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None:
            pipeline.__exit__(None, None, None)
            self._cursor.close()

    def abandon(self, exc: BaseException) -> None:
        """End the pipeline of a batch that failed (its transaction is rolled back next)."""
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None:
            try:
                pipeline.__exit__(type(exc), exc, exc.__traceback__)
            except Exception:
                pass
