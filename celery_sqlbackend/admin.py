"""Operating a store from Python: the API behind ``celery sqlq``.

For people who build their own admin pages; every function takes a
:class:`~celery_sqlbackend.store.Store` (``store_for_app(app)`` gives the one
behind a Celery app's broker) and runs short transactions of its own, so that
none holds a lock for long, however much it has to do::

    from celery_sqlbackend import admin
    store = admin.store_for_app(app)
    for q in admin.queues(store):               # ready/scheduled/claimed/failed, latency, paused
        print(q.name, q.ready, q.latency)
    admin.pause(store, "emails")                 # every worker stops claiming from it
    admin.resume(store, "emails")
    admin.clear_finished(store, older_than=3600, on_progress=print)
    admin.retry_failed_all(store, {"error_class": "ProcessPrunedError"}, on_progress=print)
    admin.migrate("postgresql+psycopg://…")      # apply the Alembic migrations
    for c in admin.check(store):                 # configuration sanity
        print(c.ok, c.name, c.detail)

Timestamps are naive UTC, like every timestamp in the store.  Long operations
accept ``on_progress(n)``, called with the number of rows each batch handled.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable, Iterable, Mapping, Sequence

from sqlalchemy import inspect, text

from . import failed as _failed
from . import failure_results, maintenance
from .failed import FailedJob, store_for_app
from .options import Options
from .store import Store, utcnow
from .store.schema import DEFAULT_PREFIX
from .urls import database_url, mask

__all__ = [
    "QueueStatus", "ProcessStatus", "Status", "CheckResult", "store_for_app",
    "status", "queues", "processes", "pause", "resume", "clear_queue", "paused",
    "scheduled", "prune", "processes_named", "clear_finished", "list_failed", "show_job", "count_failed",
    "retry_failed", "discard_failed", "retry_failed_all", "discard_failed_all",
    "migrate", "migrate_store", "current_revision", "head_revision", "check",
]

Progress = Callable[[int], None] | None


# --------------------------------------------------------------------------- status

@dataclass(frozen=True)
class QueueStatus:
    name: str
    ready: int
    scheduled: int
    claimed: int
    failed: int
    paused: bool
    oldest_ready_at: datetime | None
    #: Seconds the oldest ready job has waited (queue latency); 0 when empty.
    latency: float


@dataclass(frozen=True)
class HeldJob:
    job_id: int
    task_name: str | None
    task_id: str | None
    queue: str
    claimed_at: datetime
    started: bool           # early-acked: the task is running


@dataclass(frozen=True)
class ProcessStatus:
    id: int
    kind: str
    name: str
    hostname: str
    pid: int
    pool: str | None
    concurrency: int | None
    queues: list[str]
    started_at: datetime
    last_heartbeat_at: datetime
    #: Seconds since the last heartbeat.
    heartbeat_age: float
    #: True once the heartbeat is older than ``alive_threshold`` (prune will take it).
    dead: bool
    claimed: int
    held: list[HeldJob] = field(default_factory=list)


@dataclass(frozen=True)
class ScheduledJob:
    """A job waiting in the database for its ETA/countdown (``celery inspect scheduled`` cannot see it)."""
    job_id: int
    task_name: str | None
    task_id: str | None
    queue: str
    priority: int
    due_at: datetime
    #: Seconds until it is due (negative: due, waiting to be promoted to ready).
    due_in: float


@dataclass(frozen=True)
class Scheduled:
    jobs: list[ScheduledJob]
    #: How many scheduled jobs wait in all (``jobs`` holds the soonest of them).
    total: int


@dataclass(frozen=True)
class Status:
    queues: list[QueueStatus]
    processes: list[ProcessStatus]
    at: datetime
    scheduled: Scheduled | None = None


def queues(store: Store) -> list[QueueStatus]:
    """Every queue with work in it (or paused), by name."""
    now = utcnow()
    stats = store.queues.stats()
    out = []
    for name in sorted(stats):
        s = stats[name]
        oldest = s["oldest_ready_at"]
        latency = max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0
        out.append(QueueStatus(name=name, ready=s["ready"], scheduled=s["scheduled"], claimed=s["claimed"],
                               failed=s["failed"], paused=s["paused"], oldest_ready_at=oldest,
                               latency=latency))
    return out


def processes(store: Store, held_limit: int = 20) -> list[ProcessStatus]:
    """Registered processes, with (up to ``held_limit`` of) the jobs each holds."""
    now = utcnow()
    threshold = store.options.alive_threshold
    out = []
    for p in store.processes.listing(held_limit=held_limit):
        try:
            proc_queues = json.loads(p["queues"] or "[]")
        except ValueError:
            proc_queues = []
        age = max(0.0, (now - p["last_heartbeat_at"]).total_seconds())
        out.append(ProcessStatus(
            id=p["id"], kind=p["kind"], name=p["name"], hostname=p["hostname"], pid=p["pid"],
            pool=p["pool"], concurrency=p["concurrency"], queues=proc_queues, started_at=p["started_at"],
            last_heartbeat_at=p["last_heartbeat_at"], heartbeat_age=age, dead=age > threshold,
            claimed=p["claimed"],
            held=[HeldJob(h["job_id"], h["task_name"], h["task_id"], h["queue_name"], h["claimed_at"],
                          h["acked_at"] is not None) for h in p["held"]],
        ))
    return out


def scheduled(store: Store, queue: str | None = None, limit: int = 50) -> Scheduled:
    """The ``limit`` soonest ETA/countdown jobs waiting in the database (of ``queue``), and their total.

    Why here and not in ``celery inspect scheduled``: that asks each worker for
    the ETA tasks it holds in memory, and with this broker a job waits for its
    time in ``scheduled_executions``, not in a worker: workers receive it only
    once it is due.
    """
    if limit < 0:
        raise ValueError(f"limit must not be negative, got {limit}")
    now = utcnow()
    rows, total = store.executions.scheduled(queue=queue, limit=limit)
    return Scheduled(jobs=[ScheduledJob(job_id=r.job_id, task_name=r.task_name, task_id=r.task_id,
                                        queue=r.queue_name, priority=r.priority, due_at=r.scheduled_at,
                                        due_in=(r.scheduled_at - now).total_seconds()) for r in rows],
                     total=total)


def status(store: Store, held_limit: int = 20, scheduled_limit: int = 10) -> Status:
    return Status(queues=queues(store), processes=processes(store, held_limit), at=utcnow(),
                  scheduled=scheduled(store, limit=scheduled_limit))


def to_dict(obj: Any) -> Any:
    """A status/failed object as plain JSON-able data (datetimes as ISO strings, UTC)."""
    if hasattr(obj, "__dataclass_fields__"):
        obj = asdict(obj)
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, datetime):
        return obj.isoformat() + "Z"
    return obj


# --------------------------------------------------------------------------- queues

def pause(store: Store, queue: str) -> None:
    """Stop every worker claiming from ``queue`` (kept in the database: survives restarts)."""
    store.queues.pause(queue, now=utcnow())


def resume(store: Store, queue: str) -> None:
    store.queues.resume(queue)


def paused(store: Store) -> list[str]:
    return store.queues.paused()


def clear_queue(store: Store, queue: str) -> int:
    """Delete every waiting (ready or scheduled) job of ``queue``; claimed ones finish. Returns the count."""
    return store.queues.purge(queue)


# --------------------------------------------------------------------------- maintenance

PruneResult = maintenance.PruneResult


def prune(store: Store, app: Any = None, force: Sequence[int] = ()) -> PruneResult:
    """Now, rather than at the next heartbeat: prune dead processes (and the process ids in ``force``,
    whatever their heartbeat), recover orphaned claims, and expire the transient queues of remote
    control and events nobody reads.  With ``app``, the jobs it fails get FAILURE in the app's
    result backend (``failure_results``)."""
    report = failure_results.reporter(app, store) if app is not None else None
    return maintenance.prune_now(store, force=force, report_failed=report)


def processes_named(store: Store, name: str) -> list[Any]:
    """Registered processes whose name (``worker@host``) or id is ``name`` (for ``prune --process``)."""
    return store.processes.named(name)


def _age_cutoff(older_than: timedelta | float | int | datetime) -> datetime:
    if isinstance(older_than, datetime):
        return older_than
    if not isinstance(older_than, timedelta):
        older_than = timedelta(seconds=float(older_than))
    if older_than < timedelta(0):
        raise ValueError(f"older_than must not be negative, got {older_than}")
    return utcnow() - older_than


def count_finished(store: Store, older_than: timedelta | float | int | datetime) -> int:
    return store.jobs.count_finished(before=_age_cutoff(older_than))


def clear_finished(store: Store, older_than: timedelta | float | int | datetime,
                   batch_size: int | None = None, on_progress: Progress = None) -> int:
    """Delete jobs finished more than ``older_than`` ago (seconds, a timedelta, or a naive-UTC datetime),
    ``batch_size`` rows per transaction. Returns how many were deleted."""
    return maintenance.clear_finished(store, _age_cutoff(older_than), batch_size=batch_size,
                                      on_progress=on_progress)


# --------------------------------------------------------------------------- failed jobs

def list_failed(store: Store, queue: str | None = None, task_name: str | None = None,
                error_class: str | None = None, older_than: timedelta | float | datetime | None = None,
                limit: int | None = None) -> list[FailedJob]:
    """Failed jobs matching every filter given, oldest first (see :mod:`celery_sqlbackend.failed`)."""
    return _failed.list_failed(store, queue=queue, task_name=task_name, error_class=error_class,
                               older_than=older_than, limit=limit)


def count_failed(store: Store, filters: Mapping[str, Any] | None = None) -> int:
    where = _failed._query_filters(**_failed._check_filters(filters))
    return store.failed.count(**where)


def show_job(store: Store, job_id: int) -> dict | None:
    """One job with its state, failure (if any) and decoded message headers and body."""
    job = store.jobs.detail(job_id)
    if job is None:
        return None
    payload = job.pop("payload")
    try:
        message = json.loads(payload)
        job["headers"] = message.get("headers") or {}
        job["properties"] = {k: v for k, v in (message.get("properties") or {}).items()
                             if k in ("correlation_id", "reply_to", "priority", "delivery_info")}
        job["body"] = _decode_body(message)
    except (ValueError, TypeError, AttributeError):
        job["headers"], job["properties"], job["body"] = {}, {}, payload
    return job


def _decode_body(message: dict) -> Any:
    import base64
    body = message.get("body")
    if (message.get("properties") or {}).get("body_encoding") == "base64" and isinstance(body, str):
        body = base64.b64decode(body)
    if message.get("content-type") == "application/json":
        try:
            return json.loads(body)
        except (ValueError, TypeError):
            pass
    return body.decode("utf-8", "replace") if isinstance(body, bytes) else body


def retry_failed(store: Store, job_ids: Iterable[int]) -> int:
    """Put failed jobs back to ready (same job, same task id); returns how many were failed."""
    return _failed.retry(store, job_ids)


def discard_failed(store: Store, job_ids: Iterable[int]) -> int:
    return _failed.discard(store, job_ids)


def _bulk(store: Store, action, filters: Mapping[str, Any] | None, batch_size: int, on_progress: Progress) -> int:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # One cutoff for the whole run (``iter_failed`` evaluates the filters once), and keyset
    # pages: each batch is its own short transaction.
    total, batch = 0, []
    for job in _failed.iter_failed(store, filters, batch_size=batch_size):
        batch.append(job.job_id)
        if len(batch) >= batch_size:
            n = action(store, batch)
            total += n
            batch = []
            if on_progress:
                on_progress(n)
    if batch:
        n = action(store, batch)
        total += n
        if on_progress:
            on_progress(n)
    return total


def retry_failed_all(store: Store, filters: Mapping[str, Any] | None = None, batch_size: int = 500,
                     on_progress: Progress = None) -> int:
    """Retry every failed job matching ``filters`` (queue, task_name, error_class, older_than), in batches."""
    return _bulk(store, _failed.retry, filters, batch_size, on_progress)


def discard_failed_all(store: Store, filters: Mapping[str, Any] | None = None, batch_size: int = 500,
                       on_progress: Progress = None) -> int:
    return _bulk(store, _failed.discard, filters, batch_size, on_progress)


# --------------------------------------------------------------------------- migrations

def _alembic_config(prefix: str, **attributes):
    from alembic.config import Config

    from .store.migrations import SCRIPT_LOCATION
    cfg = Config()
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    cfg.attributes["table_prefix"] = prefix
    cfg.attributes.update(attributes)
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory
    return ScriptDirectory.from_config(_alembic_config(DEFAULT_PREFIX)).get_current_head()


def current_revision(store: Store) -> str | None:
    """The migration the database is at (None: never migrated)."""
    from alembic.runtime.migration import MigrationContext
    with store.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": f"{store.t.prefix}alembic_version"})
        return ctx.get_current_revision()


def migrate_store(store: Store, revision: str = "head") -> str:
    """Apply the migrations to ``store``'s database; returns the revision it is at afterwards.

    Tables created before without migrations (SQLite's automatic creation, or
    ``create_tables``) are adopted: the database is stamped at the initial
    revision, then upgraded.
    """
    from alembic import command
    prefix = store.t.prefix
    with store.engine.begin() as conn:
        cfg = _alembic_config(prefix, connection=conn)
        if _unversioned_tables_exist(conn, store):
            command.stamp(cfg, "0001")
        command.upgrade(cfg, revision)
    store._schema_ready = False
    return current_revision(store)


def _unversioned_tables_exist(conn, store: Store) -> bool:
    insp = inspect(conn)
    return insp.has_table(store.t.jobs.name) and not insp.has_table(f"{store.t.prefix}alembic_version")


def migrate(url: str, prefix: str = DEFAULT_PREFIX, revision: str = "head") -> str:
    """Apply the migrations to the database at SQLAlchemy ``url`` (or an ``sqlq+`` broker URL)."""
    url = database_url(url)
    return migrate_store(Store(url, Options(table_prefix=prefix, create_tables=False)), revision)


def migration_sql(url: str, prefix: str = DEFAULT_PREFIX, revision: str = "head") -> str:
    """The DDL of the migrations, for a DBA to review or apply by hand (offline mode)."""
    import contextlib
    import io

    from alembic import command
    url = database_url(url)
    buf = io.StringIO()
    cfg = _alembic_config(prefix, url=url)
    cfg.output_buffer = buf
    with contextlib.redirect_stdout(buf):
        command.upgrade(cfg, revision, sql=True)
    return buf.getvalue()


# --------------------------------------------------------------------------- check

@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    #: "error" fails ``celery sqlq check``; "warning" is only reported.
    level: str = "error"


def check(store: Store, app=None) -> list[CheckResult]:
    """Configuration sanity: thresholds, pool sizes, the database reachable, migrations current."""
    results: list[CheckResult] = []
    o = store.options

    def add(name, ok, detail, level="error"):
        results.append(CheckResult(name, bool(ok), detail, level))

    add("alive_threshold", o.alive_threshold >= 2 * o.heartbeat_interval,
        f"alive_threshold {o.alive_threshold:g}s vs heartbeat_interval {o.heartbeat_interval:g}s "
        "(must be at least twice, or one late beat gets a live worker pruned)")
    add("polling_interval", o.polling_interval <= 5,
        f"polling_interval {o.polling_interval:g}s (a queue is checked this often when idle)", "warning")
    add("keep_finished", o.keep_finished >= 0, f"keep_finished {o.keep_finished:g}s")

    concurrency = None
    pool_name = None
    if app is not None:
        concurrency = app.conf.worker_concurrency or os.cpu_count() or 1
        pool_name = app.conf.worker_pool or "prefork"
    pool = store.engine.pool
    size = getattr(pool, "size", lambda: None)()
    overflow = getattr(pool, "_max_overflow", 0) or 0
    if size is not None and concurrency and pool_name in ("threads", "gevent", "eventlet"):
        need = concurrency + 3  # tasks publishing/storing results + consumer + heartbeat + acks
        add("connection_pool", size + overflow >= need,
            f"{pool_name} pool with concurrency {concurrency} shares one engine of {size}+{overflow} "
            f"connections (needs about {need})", "warning")
    else:
        add("connection_pool", True,
            f"engine pool {size}+{overflow} connections per process"
            + (f"; worker pool {pool_name}, concurrency {concurrency}" if concurrency else ""))

    try:
        store.ping()     # (an SQLite file that cannot be opened: a ConfigurationError saying why)
        with store.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            version = conn.dialect.server_version_info
        add("database", True, f"reachable: {mask(store.engine.url)} "
            f"({store.dialect.name} {'.'.join(map(str, version or ()))})")
    except Exception as exc:
        add("database", False, f"not reachable: {exc.__class__.__name__}: {mask(exc).splitlines()[0]}")
        return results

    if store.dialect.embedded:
        import sqlite3
        add("sqlite_version", sqlite3.sqlite_version_info >= (3, 35),
            f"SQLite {sqlite3.sqlite_version} (3.35+ needed for DELETE … RETURNING)")

    head = head_revision()
    try:
        current = current_revision(store)
    except Exception as exc:
        current, detail = None, f"cannot read the version table ({exc.__class__.__name__})"
    else:
        detail = None
    if current == head:
        add("migrations", True, f"at head ({head})")
    elif current is None and inspect(store.engine).has_table(store.t.jobs.name):
        add("migrations", store.dialect.embedded or store.creates_tables,
            "tables exist but were created without migrations (create_tables); run "
            "`celery sqlq migrate` to adopt them", "warning")
    else:
        add("migrations", False, detail or f"database at {current or 'nothing'}, head is {head}: run "
            "`celery -A yourapp sqlq migrate`")
    return results
