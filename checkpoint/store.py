"""Durable checkpoints: where a job's cursor and progress survive a SIGKILL.

job-iteration saves the cursor only when the job stops cleanly; after an OOM
kill the job restarts from the cursor of its last *enqueued* message.  We also
save the cursor every N iterations / T seconds into a :class:`CursorStore`,
keyed by task id, so a message that is redelivered (acks_late, a released
claim, ``reject_on_worker_lost``) or re-sent with the same id resumes near
where the dead run was.

The SQL implementation keeps one row per iterative job in the store's
``<prefix>checkpoints`` table (defined in :mod:`celery_sqlbackend.store.schema`,
created by the Alembic migrations; SQLite creates it itself).  The row is
also what a progress view reads (:mod:`checkpoint.progress`): state, items
done, total when known, start/update/finish times.  Rows of finished,
failed and revoked jobs stay until ``checkpoint_expires`` (7 days) so that a
redelivered copy of a completed job can see it is done; :meth:`expire` removes
them, by primary key, in small batches.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
import time
import weakref
from typing import Any, Optional, Protocol

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from celery_sqlbackend.store import fork_gate, pooler, pymysql_tls
from celery_sqlbackend.store.schema import DEFAULT_PREFIX, tables
from celery_sqlbackend.urls import broker_database_url, database_url

from .cursor import Progress, validate_cursor

logger = logging.getLogger("checkpoint")

__all__ = ["Checkpointer", "CursorStore", "NullStore", "MemoryStore", "SQLCursorStore", "store_for_app",
           "store_url_for_app", "CheckpointTableMissingError", "TERMINAL_STATES", "DEFAULT_EXPIRES"]

#: States after which a job's row only waits for expiry.
TERMINAL_STATES = ("done", "failed", "revoked")
#: Seconds a row is kept after its last update (app conf ``checkpoint_expires``).
DEFAULT_EXPIRES = 7 * 24 * 3600.0


class CheckpointTableMissingError(RuntimeError):
    """The checkpoints table does not exist and this engine does not create tables at run time."""


class CursorStore(Protocol):
    """Anything that keeps progress by task id.  ``put`` receives the row's state and task name."""

    def get(self, task_id: str) -> Optional[Progress]: ...
    def put(self, task_id: str, progress: Progress, *, state: str = "running",
            task_name: Optional[str] = None, error: Optional[str] = None,
            fraction: Optional[float] = None) -> None: ...
    def delete(self, task_id: str) -> None: ...


class NullStore:
    """No durable checkpoints: a crash resumes from the last enqueued cursor."""

    durable = False

    def get(self, task_id: str) -> Optional[Progress]:
        return None

    def put(self, task_id: str, progress: Progress, **meta: Any) -> None:
        pass

    def delete(self, task_id: str) -> None:
        pass


class MemoryStore:
    """In-process store for unit tests (not shared between processes)."""

    durable = True

    def __init__(self) -> None:
        self.rows: dict[str, str] = {}
        self.states: dict[str, str] = {}

    def get(self, task_id: str) -> Optional[Progress]:
        progress = Progress.from_json(self.rows.get(task_id))
        if progress is not None:
            progress.state = self.states.get(task_id, "running")
        return progress

    def put(self, task_id: str, progress: Progress, *, state: str = "running", **meta: Any) -> None:
        self.rows[task_id] = progress.to_json()
        self.states[task_id] = state

    def delete(self, task_id: str) -> None:
        self.rows.pop(task_id, None)
        self.states.pop(task_id, None)


class Checkpointer:
    """Saves one run's progress every ``every`` iterations or ``interval`` seconds."""

    def __init__(self, store: CursorStore, task_id: Optional[str], progress: Progress,
                 every: Optional[int], interval: Optional[float], task_name: Optional[str] = None,
                 fraction: Any = None) -> None:
        self._clock = time.monotonic
        self.store = store
        self.task_id = task_id
        self.task_name = task_name
        self.progress = progress
        self.every = max(1, int(every or 1))
        self.interval = interval
        self.enabled = task_id is not None and not isinstance(store, NullStore)
        self.saved_at_iteration = progress.iterations
        self.saved_at = self._clock()
        self.first = True
        #: ``fraction(cursor) -> float | None`` of the enumeration (CSV: bytes read / file size).
        self.fraction = fraction

    def after_iteration(self) -> None:
        if self.first:
            # Fail at the first item, not at the first save or at shutdown.
            validate_cursor(self.progress.cursor)
            self.first = False
        if not self.enabled:
            return
        due_by_count = self.progress.iterations - self.saved_at_iteration >= self.every
        due_by_time = self.interval is not None and self._clock() - self.saved_at >= self.interval
        if due_by_count or due_by_time:
            self.save()

    def save(self, state: str = "running", error: Optional[str] = None) -> None:
        validate_cursor(self.progress.cursor)
        if self.enabled:
            self.store.put(self.task_id, self.progress, state=state, task_name=self.task_name, error=error,
                           fraction=self.current_fraction())
        self.saved_at_iteration = self.progress.iterations
        self.saved_at = self._clock()

    def current_fraction(self) -> Optional[float]:
        p = self.progress
        if self.fraction is not None:
            try:
                value = self.fraction(p.cursor)
            except Exception:  # a progress figure must never fail the job
                value = None
            if value is not None:
                return min(1.0, max(0.0, float(value)))
        if p.total:
            return min(1.0, p.iterations / p.total)
        return None

    def save_quietly(self, state: str = "running", error: Optional[str] = None) -> None:
        """Save after an exception; never mask the exception."""
        if not self.enabled:
            return
        try:
            self.save(state=state, error=error)
        except Exception:
            logger.exception("checkpoint: could not save the cursor of %s", self.task_id)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class SQLCursorStore:
    """Checkpoints in the ``<prefix>checkpoints`` table, one row per iterative job.

    The table comes from ``celery sqlq migrate`` (so the run-time role needs
    only SELECT/INSERT/UPDATE/DELETE); on SQLite it is created on first use,
    as every other table of the store is.
    """

    durable = True

    def __init__(self, url: str, table_prefix: str = DEFAULT_PREFIX, **engine_options: Any) -> None:
        self.url = url
        self.table = tables(table_prefix).checkpoints
        self._engine_options = engine_options
        self._engine: Optional[sa.Engine] = None
        self._pid = 0
        self._lock = threading.Lock()
        _instances.add(self)

    @property
    def engine(self) -> sa.Engine:
        # One engine per process: pooled connections must not cross fork().
        if self._engine is None or self._pid != os.getpid():
            with self._lock:
                if self._engine is None or self._pid != os.getpid():
                    engine = self._create_engine()
                    self._ensure_table(engine)
                    self._engine, self._pid = engine, os.getpid()
        return self._engine

    def _create_engine(self) -> sa.Engine:
        options = dict(self._engine_options)
        if self.url.startswith("sqlite"):
            # Several worker processes write here; wait for the lock instead of failing.
            options.setdefault("connect_args", {"timeout": 30})
            # The main process forks pool children at any time: none may inherit a transaction of ours.
            return fork_gate.guard(sa.create_engine(self.url, **options))
        url, extra = pooler.engine_arguments(self.url)   # (a pooler in transaction mode: no prepared statements)
        return pymysql_tls.install(sa.create_engine(url, **{**extra, **options}))   # (no-op but for PyMySQL)

    def _ensure_table(self, engine: sa.Engine) -> None:
        if engine.dialect.name == "sqlite":
            try:
                self.table.create(engine, checkfirst=True)
            except sa.exc.OperationalError:
                # Several worker processes may race to create it; losing the race is fine.
                if not sa.inspect(engine).has_table(self.table.name):
                    raise
            return
        if not sa.inspect(engine).has_table(self.table.name):
            shown = engine.url.render_as_string(hide_password=True)
            raise CheckpointTableMissingError(
                f"the checkpoint table {self.table.name} does not exist in {shown}; create it with "
                "`celery -A yourapp sqlq migrate` (or celery_sqlbackend.admin.migrate(url)) before "
                "running iterative tasks")

    def check(self) -> None:
        """Raise :class:`CheckpointTableMissingError` (or the driver's error) if unusable."""
        self.engine  # noqa: B018  (connects and checks the table)

    def get(self, task_id: str) -> Optional[Progress]:
        t = self.table
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(t.c.cursor, t.c.counters, t.c.iterations, t.c.total, t.c.state)
                               .where(t.c.task_id == task_id)).first()
        if row is None:
            return None
        progress = Progress.from_json(_merge(row.cursor, row.counters))
        progress.iterations = max(progress.iterations, int(row.iterations or 0))
        if progress.total is None and row.total is not None:
            progress.total = int(row.total)
        progress.state = row.state
        return progress

    def put(self, task_id: str, progress: Progress, *, state: str = "running",
            task_name: Optional[str] = None, error: Optional[str] = None,
            fraction: Optional[float] = None) -> None:
        t = self.table
        now = _utcnow()
        values = _row_values(progress)
        values.update(state=state, updated_at=now, error=error, fraction=fraction,
                      finished_at=now if state in TERMINAL_STATES else None)
        if task_name is not None:
            values["task_name"] = task_name
        with self.engine.begin() as conn:
            if conn.execute(sa.update(t).where(t.c.task_id == task_id).values(**values)).rowcount:
                return
        try:
            with self.engine.begin() as conn:
                conn.execute(sa.insert(t).values(task_id=task_id, started_at=now, **values))
        except IntegrityError:
            # Another run of the same task id inserted first: last writer wins.
            with self.engine.begin() as conn:
                conn.execute(sa.update(t).where(t.c.task_id == task_id).values(**values))

    def delete(self, task_id: str) -> None:
        t = self.table
        with self.engine.begin() as conn:
            conn.execute(sa.delete(t).where(t.c.task_id == task_id))

    def expire(self, older_than: float = DEFAULT_EXPIRES, batch_size: int = 500) -> int:
        """Delete rows not updated for ``older_than`` seconds; returns how many.

        Short transactions: ids are read first, then deleted by primary key.
        """
        t = self.table
        cutoff = _utcnow() - dt.timedelta(seconds=older_than)
        removed = 0
        while True:
            with self.engine.connect() as conn:
                ids = list(conn.scalars(sa.select(t.c.task_id).where(t.c.updated_at < cutoff)
                                        .order_by(t.c.task_id).limit(batch_size)))
            if not ids:
                return removed
            with self.engine.begin() as conn:
                removed += conn.execute(sa.delete(t).where(t.c.task_id.in_(ids),
                                                           t.c.updated_at < cutoff)).rowcount
            if len(ids) < batch_size:
                return removed

    def dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


def _row_values(progress: Progress) -> dict[str, Any]:
    decoded = json.loads(progress.to_json())
    cursor = decoded.pop("cursor")
    decoded.pop("state", None)
    return {"cursor": json.dumps(cursor), "counters": json.dumps(decoded),
            "iterations": progress.iterations, "total": progress.total}


def _merge(cursor_json: Optional[str], counters_json: str) -> str:
    data = json.loads(counters_json)
    data["cursor"] = json.loads(cursor_json) if cursor_json is not None else None
    return json.dumps(data)


_stores: dict[tuple, SQLCursorStore] = {}
_stores_lock = threading.Lock()
_instances: "weakref.WeakSet[SQLCursorStore]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The worker's housekeeping thread may hold a lock (creating an engine,
    # expiring rows) at the moment the pool forks: the child would inherit it
    # locked and hang at its first checkpoint.  Fresh locks, no inherited pool.
    global _stores_lock
    _stores_lock = threading.Lock()
    for store in list(_instances):
        store._lock = threading.Lock()
        if store._engine is not None:
            store._engine.dispose(close=False)
            store._engine = None


os.register_at_fork(after_in_child=_after_fork_in_child)


def store_url_for_app(app: Any) -> Optional[str]:
    """``checkpoint_store_url``, else the broker's database when the broker is ours."""
    url = app.conf.get("checkpoint_store_url")
    return database_url(url) if url else broker_database_url(app.conf)


def table_prefix_for_app(app: Any) -> str:
    """``checkpoint_table_prefix``, else the broker's ``table_prefix`` transport option."""
    prefix = app.conf.get("checkpoint_table_prefix")
    if prefix:
        return prefix
    from celery_sqlbackend.options import from_celery_conf   # sqlq_table_prefix counts too
    return from_celery_conf(app.conf).get("table_prefix") or DEFAULT_PREFIX


def store_for_app(app: Any) -> CursorStore:
    url = store_url_for_app(app)
    if not url:
        return NullStore()
    key = (url, table_prefix_for_app(app))
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            store = _stores[key] = SQLCursorStore(url, table_prefix=key[1])
        return store
