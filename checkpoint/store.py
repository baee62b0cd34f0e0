"""Durable crash checkpoints: where a job's cursor survives a SIGKILL.

job-iteration saves the cursor only when the job stops cleanly; after an OOM
kill the job restarts from the cursor of its last *enqueued* message.  We also
save the cursor every N iterations / T seconds into a :class:`CursorStore`,
keyed by task id, so a message that is redelivered (acks_late, a released
claim) or re-sent with the same id resumes near where the dead run was.

The store is optional and pluggable: anything with ``get/put/delete`` works.
The SQL implementation keeps one row per running job in its own table,
``sqlq_checkpoints``; with our broker (``sqlq+<url>``) it lives in the broker's
database by default.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import logging
import threading
import time
from typing import Any, Optional, Protocol

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from .cursor import Progress, validate_cursor

logger = logging.getLogger("checkpoint")

__all__ = ["Checkpointer", "CursorStore", "NullStore", "MemoryStore", "SQLCursorStore", "store_for_app", "checkpoints_table"]


class CursorStore(Protocol):
    def get(self, task_id: str) -> Optional[Progress]: ...
    def put(self, task_id: str, progress: Progress) -> None: ...
    def delete(self, task_id: str) -> None: ...


class NullStore:
    """No durable checkpoints: a crash resumes from the last enqueued cursor."""

    def get(self, task_id: str) -> Optional[Progress]:
        return None

    def put(self, task_id: str, progress: Progress) -> None:
        pass

    def delete(self, task_id: str) -> None:
        pass


class MemoryStore:
    """In-process store for unit tests (not shared between processes)."""

    def __init__(self) -> None:
        self.rows: dict[str, str] = {}

    def get(self, task_id: str) -> Optional[Progress]:
        return Progress.from_json(self.rows.get(task_id))

    def put(self, task_id: str, progress: Progress) -> None:
        self.rows[task_id] = progress.to_json()

    def delete(self, task_id: str) -> None:
        self.rows.pop(task_id, None)


class Checkpointer:
    """Saves one run's progress every ``every`` iterations or ``interval`` seconds."""

    def __init__(self, store: CursorStore, task_id: Optional[str], progress: Progress,
                 every: Optional[int], interval: Optional[float]) -> None:
        self.store = store
        self.task_id = task_id
        self.progress = progress
        self.every = max(1, int(every or 1))
        self.interval = interval
        self.enabled = task_id is not None and not isinstance(store, NullStore)
        self.saved_at_iteration = progress.iterations
        self.saved_at = time.monotonic()
        self.first = True

    def after_iteration(self) -> None:
        if self.first:
            # Fail at the first item, not at the first save or at shutdown.
            validate_cursor(self.progress.cursor)
            self.first = False
        if not self.enabled:
            return
        due_by_count = self.progress.iterations - self.saved_at_iteration >= self.every
        due_by_time = self.interval is not None and time.monotonic() - self.saved_at >= self.interval
        if due_by_count or due_by_time:
            self.save()

    def save(self) -> None:
        validate_cursor(self.progress.cursor)
        self.store.put(self.task_id, self.progress)
        self.saved_at_iteration = self.progress.iterations
        self.saved_at = time.monotonic()

    def save_quietly(self) -> None:
        """Save after an exception, if anything is new; never mask the exception."""
        if not self.enabled or self.progress.iterations == self.saved_at_iteration:
            return
        try:
            self.save()
        except Exception:
            logger.exception("checkpoint: could not save the cursor of %s", self.task_id)


metadata = sa.MetaData()

checkpoints_table = sa.Table(
    "sqlq_checkpoints",
    metadata,
    # Celery task ids are UUIDs but may be any string the caller chose.
    sa.Column("task_id", sa.String(255), primary_key=True),
    sa.Column("cursor", sa.Text, nullable=True),  # JSON
    sa.Column("counters", sa.Text, nullable=False),  # JSON: iterations, times_interrupted, total_time
    sa.Column("updated_at", sa.DateTime, nullable=False),
)


class SQLCursorStore:
    """Checkpoints in a SQL table, one row per unfinished job."""

    def __init__(self, url: str, **engine_options: Any) -> None:
        self.url = url
        self._engine_options = engine_options
        self._engine: Optional[sa.Engine] = None
        self._pid = 0
        self._lock = threading.Lock()

    @property
    def engine(self) -> sa.Engine:
        # One engine per process: pooled connections must not cross fork().
        if self._engine is None or self._pid != os.getpid():
            with self._lock:
                if self._engine is None or self._pid != os.getpid():
                    engine = self._create_engine()
                    _create_table(engine)
                    self._engine, self._pid = engine, os.getpid()
        return self._engine

    def _create_engine(self) -> sa.Engine:
        options = dict(self._engine_options)
        if self.url.startswith("sqlite"):
            # Several worker processes write here; wait for the lock instead of failing.
            options.setdefault("connect_args", {"timeout": 30})
        return sa.create_engine(self.url, **options)

    def get(self, task_id: str) -> Optional[Progress]:
        t = checkpoints_table
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(t.c.cursor, t.c.counters).where(t.c.task_id == task_id)).first()
        if row is None:
            return None
        return Progress.from_json(_merge(row.cursor, row.counters))

    def put(self, task_id: str, progress: Progress) -> None:
        t = checkpoints_table
        values = _row_values(progress)
        values["updated_at"] = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        with self.engine.begin() as conn:
            updated = conn.execute(sa.update(t).where(t.c.task_id == task_id).values(**values)).rowcount
            if updated:
                return
        try:
            with self.engine.begin() as conn:
                conn.execute(sa.insert(t).values(task_id=task_id, **values))
        except IntegrityError:
            # Another run of the same task id inserted first: last writer wins.
            with self.engine.begin() as conn:
                conn.execute(sa.update(t).where(t.c.task_id == task_id).values(**values))

    def delete(self, task_id: str) -> None:
        t = checkpoints_table
        with self.engine.begin() as conn:
            conn.execute(sa.delete(t).where(t.c.task_id == task_id))

    def dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


def _create_table(engine: sa.Engine) -> None:
    try:
        metadata.create_all(engine, checkfirst=True)
    except sa.exc.DBAPIError:
        # Several worker processes may race to create it; losing the race is fine.
        if not sa.inspect(engine).has_table(checkpoints_table.name):
            raise


def _row_values(progress: Progress) -> dict[str, Any]:
    data = progress.to_json()
    decoded = json.loads(data)
    cursor = decoded.pop("cursor")
    return {"cursor": json.dumps(cursor), "counters": json.dumps(decoded)}


def _merge(cursor_json: Optional[str], counters_json: str) -> str:
    data = json.loads(counters_json)
    data["cursor"] = json.loads(cursor_json) if cursor_json is not None else None
    return json.dumps(data)


_stores: dict[str, SQLCursorStore] = {}
_stores_lock = threading.Lock()


def store_url_for_app(app: Any) -> Optional[str]:
    """``checkpoint_store_url``, else the broker's database when the broker is ours."""
    url = app.conf.get("checkpoint_store_url")
    if url:
        return url
    broker = app.conf.broker_url or ""
    if isinstance(broker, str) and broker.startswith("sqlq+"):
        return broker[len("sqlq+"):]
    return None


def store_for_app(app: Any) -> CursorStore:
    url = store_url_for_app(app)
    if not url:
        return NullStore()
    with _stores_lock:
        store = _stores.get(url)
        if store is None:
            store = _stores[url] = SQLCursorStore(url)
        return store
