"""The tables, as SQLAlchemy Core definitions.

The layout follows Solid Queue: ``jobs`` is the permanent record of every
message, and a job's state is *which execution row exists for it*:

    ready_executions      waiting to be claimed (the small, hot, polled table)
    scheduled_executions  has an ETA in the future; promoted to ready when due
    claimed_executions    delivered to a registered process, not yet finished
    failed_executions     will not run again on its own (pruned, poison, undecodable)

A job with none of these is finished (``jobs.finished_at`` is set).  Keeping
the polled tables separate from ``jobs`` means the claim query scans only
waiting work, however long the history grows.

Every table name carries a configurable prefix so that several stores (or an
application's own tables) can share one database.
"""
from __future__ import annotations

from functools import lru_cache

from sqlalchemy import inspect as inspect_db
from sqlalchemy.schema import CreateColumn
from sqlalchemy import (
    BigInteger, Boolean, Column, DateTime, Float, ForeignKey, Index, Integer, LargeBinary, MetaData,
    String, Table, Text, UniqueConstraint,
)
from sqlalchemy.dialects import mysql

DEFAULT_PREFIX = "sqlq_"

#: An auto-incrementing 64-bit key on every engine.  SQLite only auto-increments
#: a column declared exactly ``INTEGER PRIMARY KEY``, hence the variant.
Id = BigInteger().with_variant(Integer(), "sqlite")

#: MySQL/MariaDB types where the generic ones fall short there: a plain DATETIME
#: keeps whole seconds (heartbeats, claim times and result order need
#: microseconds), and TEXT/BLOB stop at 64 KiB (a task's arguments and a result
#: may be megabytes).  Other engines get the generic type.  Revision 0003 moves
#: a database made by 0001 to these.
Timestamp = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
LongText = Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
LongBinary = LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")


def _ts(name: str, **kw) -> Column:
    # Naive UTC everywhere: SQLite has no time zones, and one convention on
    # every engine keeps comparisons (due, expired, dead) trivially right.
    return Column(name, Timestamp, **kw)


class Tables:
    """All tables of one store, named with its prefix."""

    def __init__(self, prefix: str = DEFAULT_PREFIX):
        self.prefix = prefix
        self.metadata = md = MetaData()
        #: Hot statements built once (see ``sql.prebuilt``), by (name, dialect name).
        self.prebuilt: dict[tuple[str, str], object] = {}
        #: How many times this process has made old jobs ready again (``claim_resume.note_made_ready``).
        self.made_ready = 0
        p = prefix

        def job_fk():
            return Column("job_id", Id, ForeignKey(f"{p}jobs.id", ondelete="CASCADE"), nullable=False)

        self.jobs = Table(
            f"{p}jobs", md,
            Column("id", Id, primary_key=True, autoincrement=True),
            Column("queue_name", String(255), nullable=False),
            Column("task_name", String(255)),
            Column("task_id", String(255)),
            Column("priority", Integer, nullable=False, default=0),
            Column("payload", LongText, nullable=False),
            _ts("created_at", nullable=False),
            _ts("scheduled_at"),
            _ts("expires_at"),
            _ts("finished_at"),
            # How many of its deliveries to a worker have ended (a claim under way
            # is delivery ``deliveries + 1``: ``deliveries``), and how often a
            # pruner gave it back to the queue (bounded by ``max_releases``).
            Column("deliveries", Integer, nullable=False, default=0),
            Column("releases", Integer, nullable=False, default=0),
            Index(f"ix_{p}jobs_task_id", "task_id"),
            Index(f"ix_{p}jobs_finished_at", "finished_at"),
            Index(f"ix_{p}jobs_queue_finished", "queue_name", "finished_at"),
        )

        self.ready = Table(
            f"{p}ready_executions", md,
            Column("id", Id, primary_key=True, autoincrement=True),
            job_fk(),
            Column("queue_name", String(255), nullable=False),
            Column("priority", Integer, nullable=False, default=0),
            _ts("created_at", nullable=False),
            UniqueConstraint("job_id", name=f"uq_{p}ready_job"),
            # Must match claims.claim's ORDER BY exactly (higher priority
            # first, FIFO within a priority), or MySQL falls back to a filesort
            # and locks every row it scans.
            Index(f"ix_{p}ready_poll", "queue_name", Column("priority").desc(), "job_id"),
        )

        self.scheduled = Table(
            f"{p}scheduled_executions", md,
            Column("id", Id, primary_key=True, autoincrement=True),
            job_fk(),
            Column("queue_name", String(255), nullable=False),
            Column("priority", Integer, nullable=False, default=0),
            _ts("scheduled_at", nullable=False),
            UniqueConstraint("job_id", name=f"uq_{p}scheduled_job"),
            Index(f"ix_{p}scheduled_due", "scheduled_at", "job_id"),
        )

        self.claimed = Table(
            f"{p}claimed_executions", md,
            Column("id", Id, primary_key=True, autoincrement=True),
            job_fk(),
            Column("process_id", Id, nullable=False),
            Column("queue_name", String(255), nullable=False),
            _ts("claimed_at", nullable=False),
            # Set when kombu acked the delivery while the task is still running
            # (Celery's default early ack).  A pruner must then *fail* the job
            # instead of releasing it: it may already have had side effects.
            _ts("acked_at"),
            UniqueConstraint("job_id", name=f"uq_{p}claimed_job"),
            Index(f"ix_{p}claimed_process", "process_id", "job_id"),
        )

        self.failed = Table(
            f"{p}failed_executions", md,
            Column("id", Id, primary_key=True, autoincrement=True),
            job_fk(),
            Column("queue_name", String(255), nullable=False),
            Column("error_class", String(255), nullable=False),
            Column("error", LongText, nullable=False),
            _ts("failed_at", nullable=False),
            UniqueConstraint("job_id", name=f"uq_{p}failed_job"),
            Index(f"ix_{p}failed_at", "failed_at"),
        )

        self.processes = Table(
            f"{p}processes", md,
            Column("id", Id, primary_key=True, autoincrement=True),
            Column("kind", String(32), nullable=False),
            Column("name", String(255), nullable=False),
            Column("hostname", String(255), nullable=False),
            Column("pid", Integer, nullable=False),
            # What identifies this run of ``pid`` (boot, PID namespace, start time; see
            # ``pid_identity``), so a pruner on the same host can see at once that it is gone.
            Column("pid_identity", String(255)),
            Column("pool", String(32)),
            Column("concurrency", Integer),
            Column("queues", Text),
            _ts("started_at", nullable=False),
            _ts("last_heartbeat_at", nullable=False),
            Index(f"ix_{p}processes_heartbeat", "last_heartbeat_at"),
            # Process ids must never be reused: every fenced statement names one,
            # and a pruned process that is still alive keeps using its old id.
            # Without AUTOINCREMENT SQLite hands the highest deleted id out again.
            sqlite_autoincrement=True,
        )

        self.pauses = Table(
            f"{p}pauses", md,
            Column("queue_name", String(255), primary_key=True),
            _ts("created_at", nullable=False),
        )

        # Fanout bindings live in the database so that a broadcast published on
        # one machine reaches the queues declared by workers on every other.
        self.bindings = Table(
            f"{p}bindings", md,
            Column("id", Id, primary_key=True, autoincrement=True),
            Column("exchange", String(255), nullable=False),
            Column("queue_name", String(255), nullable=False),
            Column("routing_key", String(255), nullable=False, default=""),
            _ts("expires_at"),
            UniqueConstraint("exchange", "queue_name", "routing_key", name=f"uq_{p}binding"),
        )

        # Result backend (celery_sqlbackend.backend).  ``payload`` is the whole
        # Celery meta dict encoded with the configured ``result_serializer``
        # (bytes: msgpack and pickle are binary); the plain columns beside it
        # exist for SQL (waiting, expiry, looking results up by job or worker).
        self.results = Table(
            f"{p}results", md,
            Column("id", Id, primary_key=True, autoincrement=True),
            Column("task_id", String(255), nullable=False),
            Column("status", String(50), nullable=False),
            Column("content_type", String(128), nullable=False),
            Column("content_encoding", String(64), nullable=False),
            Column("payload", LongBinary, nullable=False),
            Column("name", String(255)),
            Column("worker", String(255)),
            Column("retries", Integer),
            Column("queue", String(255)),
            Column("group_id", String(255)),
            _ts("date_done"),
            # Last write; what ``result_expires`` counts from.
            _ts("updated_at", nullable=False),
            UniqueConstraint("task_id", name=f"uq_{p}results_task"),
            Index(f"ix_{p}results_updated_at", "updated_at"),
        )

        self.groups = Table(
            f"{p}groups", md,
            Column("id", Id, primary_key=True, autoincrement=True),
            Column("group_id", String(255), nullable=False),
            Column("content_type", String(128), nullable=False),
            Column("content_encoding", String(64), nullable=False),
            Column("payload", LongBinary, nullable=False),
            _ts("date_done", nullable=False),
            UniqueConstraint("group_id", name=f"uq_{p}groups_group"),
            Index(f"ix_{p}groups_date_done", "date_done"),
        )

        # One row per running chord: the header parts count ``done`` up; the
        # part that finds ``done >= size`` with ``fired`` still false sets it
        # and publishes the body, so the body is sent once.  ``size`` stays
        # NULL until the producer has sent the last header task.
        self.chords = Table(
            f"{p}chords", md,
            Column("group_id", String(255), primary_key=True),
            Column("size", Integer),
            Column("done", Integer, nullable=False, default=0),
            Column("fired", Boolean, nullable=False, default=False),
            _ts("created_at", nullable=False),
            Index(f"ix_{p}chords_created_at", "created_at"),
        )

        # Unique jobs (``sqlq_unique``): one row per key that is held, and by which
        # task.  The primary key is what makes a second enqueue lose, whatever the
        # number of producers.  ``held_until``: "claimed" (while waiting) or
        # "finished" (while waiting or running), released in the transaction
        # that claims, finishes or fails ``job_id`` (and with the job row);
        # NULL: held until ``expires_at`` whatever becomes of the job.
        self.unique_keys = Table(
            f"{p}unique_keys", md,
            Column("key", String(255), primary_key=True),
            Column("task_id", String(255), nullable=False),
            Column("job_id", Id, ForeignKey(f"{p}jobs.id", ondelete="CASCADE")),
            Column("held_until", String(16)),
            _ts("expires_at"),
            _ts("created_at", nullable=False),
            Index(f"ix_{p}unique_keys_job", "job_id"),
            Index(f"ix_{p}unique_keys_expires", "expires_at"),
        )

        # Limits (celery_sqlbackend.limits): what a limited job declared, kept while it exists, so
        # that a job whose ETA comes, or that a slot lets in, is routed by its own limits.
        self.job_limits = Table(
            f"{p}job_limits", md,
            Column("job_id", Id, ForeignKey(f"{p}jobs.id", ondelete="CASCADE"), primary_key=True,
                   autoincrement=False),
            Column("concurrency_key", String(255)),
            Column("concurrency_limit", Integer),
            Column("concurrency_duration", Float),
            Column("rate_key", String(255)),
            Column("rate_limit", Integer),
            Column("rate_period", Float),
        )

        # ``Concurrency``: one row per key (its current limit, locked by whoever counts its
        # holds), and one hold per job running or ready under it.  Holds have no foreign
        # key: a finish that deletes its job row must still find the key to let the next in.
        self.semaphores = Table(
            f"{p}semaphores", md,
            Column("key", String(255), primary_key=True),
            Column("slots", Integer, nullable=False),
            _ts("updated_at", nullable=False),
        )
        self.semaphore_holds = Table(
            f"{p}semaphore_holds", md,
            Column("job_id", Id, primary_key=True, autoincrement=False),
            Column("key", String(255), nullable=False),
            _ts("expires_at", nullable=False),
            Index(f"ix_{p}semaphore_holds_key", "key", "expires_at"),
            Index(f"ix_{p}semaphore_holds_expires", "expires_at"),
        )

        # Jobs waiting on a limit: ``kind`` "concurrency" (for a slot of ``key``) or "rate" (for
        # a start of ``key``).  The index is the order they are let in: priority, then FIFO.
        self.blocked = Table(
            f"{p}blocked_executions", md,
            Column("id", Id, primary_key=True, autoincrement=True),
            job_fk(),
            Column("queue_name", String(255), nullable=False),
            Column("priority", Integer, nullable=False, default=0),
            Column("kind", String(16), nullable=False),
            Column("key", String(255), nullable=False),
            _ts("created_at", nullable=False),
            UniqueConstraint("job_id", name=f"uq_{p}blocked_job"),
            Index(f"ix_{p}blocked_next", "kind", "key", Column("priority").desc(), "job_id"),
            Index(f"ix_{p}blocked_queue", "queue_name"),
        )

        # ``Rate``: per key, the claim times of its last ``max_starts`` starts (JSON, epoch
        # seconds) and when it next opens (NULL: no job waits on it).
        self.rate_keys = Table(
            f"{p}rate_keys", md,
            Column("key", String(255), primary_key=True),
            Column("max_starts", Integer, nullable=False),
            Column("period", Float, nullable=False),
            Column("starts", Text, nullable=False),
            _ts("next_open"),
            _ts("updated_at", nullable=False),
            Index(f"ix_{p}rate_keys_next_open", "next_open"),
        )

        # Recurring tasks (celery_sqlbackend.beat): the declared baseline (``beat_schedule``,
        # ``declared``) and runtime additions, read by every scheduler on each tick.
        # ``schedule`` is JSON (see celery_sqlbackend.slots); slots after ``since_at``
        # and after ``last_slot_at`` (the latest enqueued by any scheduler) are due.
        self.recurring_tasks = Table(
            f"{p}recurring_tasks", md,
            Column("key", String(255), primary_key=True),
            Column("task", String(255), nullable=False),
            Column("schedule", Text, nullable=False),
            Column("args", Text, nullable=False),
            Column("kwargs", Text, nullable=False),
            Column("options", Text, nullable=False),
            Column("missed", String(16), nullable=False),     # skip | latest | catch_up
            Column("catch_up", Integer, nullable=False, default=0),
            Column("paused", Boolean, nullable=False, default=False),
            Column("declared", Boolean, nullable=False, default=False),
            _ts("since_at", nullable=False),
            _ts("last_slot_at"),
            _ts("last_run_at"),
            Column("last_task_id", String(255)),
            _ts("created_at", nullable=False),
            _ts("updated_at", nullable=False),
        )

        # One row per (recurring task, slot time) enqueued: the unique key is what makes
        # every scheduler but one lose the race for a slot, in the job's own transaction.
        self.recurring_executions = Table(
            f"{p}recurring_executions", md,
            Column("id", Id, primary_key=True, autoincrement=True),
            Column("task_key", String(255), nullable=False),
            _ts("slot_at", nullable=False),
            Column("task_id", String(255), nullable=False),
            Column("manual", Boolean, nullable=False, default=False),
            _ts("created_at", nullable=False),
            UniqueConstraint("task_key", "slot_at", name=f"uq_{p}recurring_slot"),
            Index(f"ix_{p}recurring_executions_created", "created_at"),
        )

        # checkpoint (resumable iterative tasks): one row per iterative job, its
        # durable cursor and the progress a dashboard shows.  Defined here so the
        # migrations and checkpoint.store share it; see checkpoint/store.py.
        self.checkpoints = Table(
            f"{p}checkpoints", md,
            Column("task_id", String(255), primary_key=True),
            Column("task_name", String(255)),
            # running | interrupted | done | failed | revoked
            Column("state", String(16), nullable=False, default="running", server_default="running"),
            Column("cursor", LongText),  # JSON
            Column("counters", LongText, nullable=False),  # JSON: times_interrupted, total_time, ...
            Column("iterations", BigInteger, nullable=False, default=0, server_default="0"),
            Column("total", BigInteger),
            Column("fraction", Float),
            Column("error", LongText),
            _ts("started_at"),
            _ts("updated_at", nullable=False),
            _ts("finished_at"),
            Index(f"ix_{p}checkpoints_updated_at", "updated_at"),
        )


@lru_cache(maxsize=None)
def tables(prefix: str = DEFAULT_PREFIX) -> Tables:
    """One shared ``Tables`` per prefix (table objects are immutable once built)."""
    return Tables(prefix)


def missing_columns(inspector, t: Tables) -> list:
    """The nullable columns this version defines that existing tables lack, as ``(table, column)``."""
    missing = []
    for table in t.metadata.sorted_tables:
        if not inspector.has_table(table.name):
            continue
        present = {c["name"] for c in inspector.get_columns(table.name)}
        missing += [(table, column) for column in table.columns
                    if column.name not in present and column.nullable and not column.primary_key]
    return missing


def add_missing_columns(conn, t: Tables) -> list[str]:
    """Add to existing tables the nullable columns this version defines and they lack; returns them.

    Why: tables created at run time (SQLite's default) get no migrations, yet a
    newer version may add a column (``processes.pid_identity``).  Only nullable
    columns are ever added this way; anything else needs a migration.
    """
    added = []
    for table, column in missing_columns(inspect_db(conn), t):
        ddl = CreateColumn(column).compile(dialect=conn.dialect)
        conn.exec_driver_sql(f"ALTER TABLE {conn.dialect.identifier_preparer.format_table(table)} ADD COLUMN {ddl}")
        added.append(f"{table.name}.{column.name}")
    return added
