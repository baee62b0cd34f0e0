"""The store: one object per database URL, shared by transport, backend and tools.

``Store`` owns the engine, the tables and the dialect, and runs every
statement inside a bounded, retried transaction: a transaction
that loses a lock race (SQLite busy, PostgreSQL deadlock or serialization
failure, MySQL 1213) is rolled back and run again with jittered backoff, a
fixed number of times, and counted (``lock_retries``: DEBUG per retry, a
WARNING when a minute has many).  Nothing half-done survives a failed attempt, because
each attempt is its own transaction.

Statements live in one module per table family, as plain functions taking
an open connection (for composing several in one ``store.run``), and are
called through the store's typed gateways, one per module::

    store.jobs.enqueue(queue=…, payload=…, …) -> int          (jobs)
    store.executions.dispatch_due(now=…, limit=…) -> int      (executions: ready, scheduled)
    store.claims.claim(queues=…, limit=…, process_id=…, now=…) -> list[Claimed]   (claims)
    store.failed.retry(job_ids=…, now=…) -> int                (failed)
    store.processes.heartbeat(process_id=…, now=…) -> bool     (processes)
    store.queues.pause(queue, now=…)                            (queues)
    store.bindings.bind(exchange=…, queue=…, …)                (bindings)
    store.results.store_result(task_id=…, …) -> bool           (results)
    store.jobs.add(NewJob(…)) -> Enqueued                      (jobs; one round trip on PostgreSQL)
    store.unique_keys.clear_expired(now=…, limit=…) -> int     (unique_keys)

The worker's hot writes (a claim loop, a heartbeat) are one statement each;
on PostgreSQL they go in autocommit on a connection their thread keeps, so
each is one round trip (``run(single=True)``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import time
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, Callable, TypeVar

from sqlalchemy import inspect
from sqlalchemy.exc import OperationalError

from ..errors import ConfigurationError, SchemaMissingError
from ..options import Options
from ..urls import mask, validate
from .bindings import Bindings
from .claims import Claimed, Claims
from . import lock_retries, pooler
from .dialects import dialect_of, retry_cause
from .engine import READ_ONLY, get_engine
from .executions import Executions
from .failed import Failed
from .jobs import Jobs
from .limits import Limits
from .processes import Orphan, Processes
from .queues import Queues
from .recurring import Recurring
from .results import Results
from .schema import add_missing_columns, missing_columns, tables
from .unique_keys import UniqueKeys

__all__ = ["Claimed", "Orphan", "Store", "store_for", "utcnow"]

log = logging.getLogger("celery_sqlbackend.store")
T = TypeVar("T")


def utcnow() -> datetime:
    """Naive UTC, the convention of every timestamp column."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Store:
    """Jobs, executions and processes in one database; statements through its gateways (module doc)."""

    def __init__(self, url: str, options: Options | None = None):
        self.url = validate(url)
        self.options = options or Options()
        self.engine = get_engine(url, self.options.busy_timeout)
        self.t = tables(self.options.table_prefix)
        self.dialect = dialect_of(self.engine)
        #: ``session`` or ``transaction``: the pooler between us and the server (``store.pooler``).
        self.pool_mode = pooler.pool_mode(url)
        #: Settings sent at the start of every transaction on the thread's own connections,
        #: where a setting for the session would outlive our turn on the server connection.
        self._local_settings: tuple[str, ...] = ()
        if self.pool_mode == "transaction":
            self._local_settings = pooler.per_transaction(self.dialect.own_connection_settings)
            self.dialect = replace(self.dialect, own_connection_settings=(), server_prepared=False)
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        self._local = threading.local()   # see _own_connection
        self.jobs = Jobs(self)
        self.executions = Executions(self)
        self.claims = Claims(self)
        self.failed = Failed(self)
        self.processes = Processes(self)
        self.queues = Queues(self)
        self.bindings = Bindings(self)
        self.results = Results(self)
        self.unique_keys = UniqueKeys(self)
        self.recurring = Recurring(self)
        self.limits = Limits(self)

    def __repr__(self) -> str:
        return f"<Store {mask(self.engine.url)}>"

    # ------------------------------------------------------------------ plumbing

    def run(self, fn: Callable[..., T], *args: Any, read_only: bool = False, single: bool = False,
            kept: bool = False, commits_itself: bool = False, **kwargs: Any) -> T:
        """Run ``fn(conn, *args, **kwargs)`` in a transaction, retrying lost lock races.

        ``single``: ``fn`` runs exactly one statement.  Where the dialect saves
        round trips that way (``autocommit_single``), it is sent on its own, on
        the calling thread's own connection (see ``_own_connection``).
        ``kept``: a long-lived loop calls (the claim loop): the transaction runs
        on a connection the thread keeps, so no pool checkout pings the server
        each time (a round trip in every loop on MySQL).
        ``commits_itself``: ``fn`` sends its own ``START TRANSACTION`` and
        ``COMMIT`` (MariaDB's claim packet carries both: ``claim_packet``); it
        runs on the thread's own connection in autocommit mode, outside any
        transaction of SQLAlchemy's, whose commit would be one more round trip.
        If it raises, that connection is closed, which rolls back whatever it left open.
        """
        self.ensure_schema()
        return self._run(fn, *args, read_only=read_only, single=single, kept=kept, commits_itself=commits_itself,
                         **kwargs)

    def _run(self, fn, *args, read_only=False, single=False, kept=False, commits_itself=False, **kwargs):
        attempts = self.options.retry_attempts
        local = self._local_settings if kept else ()   # (behind a transaction pooler: SET LOCAL, in a transaction)
        autocommit = commits_itself or (single and self.dialect.autocommit_single and not local)
        own = autocommit or (kept and not self.dialect.embedded)   # (SQLite: opening one costs no round trip)
        for attempt in range(1, attempts + 1):
            try:
                with self._own_connection(autocommit) if own else self.engine.connect() as conn:
                    if read_only:
                        conn = conn.execution_options(**READ_ONLY)
                    if commits_itself:
                        return fn(conn, *args, **kwargs)
                    with conn.begin():
                        for setting in local:
                            conn.exec_driver_sql(setting)
                        return fn(conn, *args, **kwargs)
            except Exception as exc:
                if own:
                    self.close_own_connection()
                cause = retry_cause(exc)
                if attempt == attempts or cause is None:
                    raise
                delay = min(1.0, 0.01 * 2 ** attempt) * (0.5 + random.random())
                lock_retries.record(cause, getattr(fn, "__name__", str(fn)), attempt, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _own_connection(self, autocommit: bool = True):
        """This thread's long-lived connection: in autocommit for one-statement transactions, or not (``kept``).

        Why: a pool checkout pings the server (``pool_pre_ping``), which on a
        busy worker's claim loop is a second round trip per statement.  A
        connection kept by the thread is pinged once, when it is opened; if
        the database goes away, the statement fails, the connection is dropped
        (``close_own_connection``), and the next one is opened (and pinged) afresh.
        """
        # Keyed by pid: a forked child opens its own and never touches (or
        # lets the garbage collector close) the one it inherited.
        owned = getattr(self._local, "by_pid", None)
        if owned is None:
            owned = self._local.by_pid = {}
        key = (os.getpid(), autocommit)
        conn = owned.get(key)
        if conn is None or conn.closed or conn.invalidated:
            conn = owned[key] = self.engine.connect()
            if autocommit:
                conn = owned[key] = conn.execution_options(isolation_level="AUTOCOMMIT")
            if self.dialect.own_connection_settings:
                for setting in self.dialect.own_connection_settings:
                    conn.exec_driver_sql(setting)
                conn.commit()   # (ends SQLAlchemy's autobegun transaction; the server has none)
        yield conn

    def close_own_connection(self) -> None:
        """Close the calling thread's own connection, if it has one (long-lived threads call it as they end)."""
        owned = getattr(self._local, "by_pid", {})
        for key in [(os.getpid(), True), (os.getpid(), False)]:
            conn = owned.pop(key, None)
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()

    def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``run`` for a transaction that only reads (on SQLite it never takes the write lock)."""
        return self.run(fn, *args, read_only=True, **kwargs)

    def ping(self) -> None:
        """Raise if the database cannot be reached (kombu retries connects with backoff)."""
        try:
            with self.engine.connect() as conn:
                # (Read-only: on SQLite no write lock, which a caller's open transaction may hold: enqueue_in.)
                conn.execution_options(**READ_ONLY).exec_driver_sql("SELECT 1")
        except OperationalError as exc:
            if self.dialect.embedded and "unable to open database file" in str(exc):
                # Not a connection to retry: the file cannot be opened until someone fixes it.
                raise ConfigurationError(
                    f"SQLite cannot open or create {self.engine.url.database!r} (unable to open database "
                    "file): its directory must exist and be writable by this user; fix that, or point "
                    "the URL at a writable directory") from None
            raise

    # ------------------------------------------------------------------ schema

    @property
    def creates_tables(self) -> bool:
        if self.options.create_tables is not None:
            return self.options.create_tables
        return self.dialect.embedded

    def ensure_schema(self) -> None:
        """Create missing tables (SQLite by default) or say how to, once per process."""
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            if self.creates_tables:
                if not self._all_tables_exist():
                    self._run(self._create_tables)
            elif not inspect(self.engine).has_table(self.t.processes.name):
                raise SchemaMissingError(
                    f"the celery_sqlbackend tables ({self.t.prefix}*) do not exist in "
                    f"{mask(self.engine.url)}; create them with "
                    "`celery -A yourapp sqlq migrate` (or set broker_transport_options="
                    "{'create_tables': True})")
            self._schema_ready = True

    def _all_tables_exist(self) -> bool:
        """A read-only look first: creating nothing still takes SQLite's write lock, which a caller's
        open transaction may hold (``enqueue_in``).  False also when a table lacks a column this
        version added (``schema.missing_columns``)."""
        with self.engine.connect() as conn:
            inspector = inspect(conn.execution_options(**READ_ONLY))
            present = set(inspector.get_table_names())
            if not all(table.name in present for table in self.t.metadata.sorted_tables):
                return False
            return not missing_columns(inspector, self.t)

    def create_all(self) -> None:
        self._run(self._create_tables)
        self._schema_ready = True

    def _create_tables(self, conn) -> None:
        """Create missing tables, and add the nullable columns later versions added to existing ones
        (a database this store created itself has no migrations to do it; see ``schema.add_missing_columns``)."""
        self.t.metadata.create_all(conn)
        add_missing_columns(conn, self.t)


_stores: dict[tuple, Store] = {}
_stores_lock = threading.Lock()


def store_for(url: str, options: Options | None = None) -> Store:
    """The shared ``Store`` for ``url`` and ``options`` in this process."""
    options = options or Options()
    key = (url, options)
    store = _stores.get(key)
    if store is None:
        with _stores_lock:
            store = _stores.get(key)
            if store is None:
                store = _stores[key] = Store(url, options)
    return store
