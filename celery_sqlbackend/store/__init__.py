"""The store: one object per database URL, shared by transport, backend and tools.

``Store`` owns the engine, the tables and the dialect, and runs every
statement of ``queries`` inside a bounded, retried transaction: a transaction
that loses a lock race (SQLite busy, PostgreSQL deadlock or serialization
failure, MySQL 1213) is rolled back and run again with jittered backoff, a
fixed number of times.  Nothing half-done survives a failed attempt, because
each attempt is its own transaction.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, TypeVar

from sqlalchemy import inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from ..errors import ConfigurationError, SchemaMissingError
from ..options import Options
from . import queries
from .dialects import dialect_of, is_retryable
from .engine import READ_ONLY, get_engine
from .schema import tables

log = logging.getLogger("celery_sqlbackend.store")
T = TypeVar("T")


def utcnow() -> datetime:
    """Naive UTC, the convention of every timestamp column."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def validate_url(url: str) -> str:
    """Check an SQLAlchemy URL early, with an error that says what to write."""
    try:
        parsed = make_url(url)
        parsed.get_dialect()
    except (ArgumentError, ValueError) as exc:
        raise ConfigurationError(
            f"{url!r} is not an SQLAlchemy database URL ({exc}). Write the broker URL as "
            "'sqlq+sqlite:///path/jobs.sqlite3' or 'sqlq+postgresql+psycopg://user:pass@host/db'") from None
    except NoSuchModuleError as exc:
        raise ConfigurationError(
            f"no SQLAlchemy dialect for {url!r} ({exc}). Write the broker URL as "
            "'sqlq+sqlite:///path/jobs.sqlite3' or 'sqlq+postgresql+psycopg://user:pass@host/db', "
            "and install the driver (pip install 'celery-sqlbackend[postgres]')") from None
    except ImportError as exc:
        raise ConfigurationError(
            f"the database driver for {url!r} is not installed ({exc}); for PostgreSQL: "
            "pip install 'celery-sqlbackend[postgres]'") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ConfigurationError(
            "an in-memory SQLite database cannot be shared between a producer and a worker; "
            "give it a file: 'sqlq+sqlite:///jobs.sqlite3'")
    return url


class Store:
    """Jobs, executions and processes in one database (see ``queries`` for the SQL)."""

    def __init__(self, url: str, options: Options | None = None):
        self.url = validate_url(url)
        self.options = options or Options()
        self.engine = get_engine(url, self.options.busy_timeout)
        self.t = tables(self.options.table_prefix)
        self.dialect = dialect_of(self.engine)
        self._schema_ready = False
        self._schema_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Store {self.engine.url.render_as_string(hide_password=True)}>"

    # ------------------------------------------------------------------ plumbing

    def run(self, fn: Callable[..., T], *args: Any, read_only: bool = False, single: bool = False,
            **kwargs: Any) -> T:
        """Run ``fn(conn, *args, **kwargs)`` in a transaction, retrying lost lock races.

        ``single``: ``fn`` runs exactly one statement, which is then sent on
        its own where the dialect saves round trips that way (``autocommit_single``).
        """
        self.ensure_schema()
        return self._run(fn, *args, read_only=read_only, single=single, **kwargs)

    def _run(self, fn, *args, read_only=False, single=False, **kwargs):
        attempts = self.options.retry_attempts
        for attempt in range(1, attempts + 1):
            try:
                conn_ctx = self.engine.connect()
                with conn_ctx as conn:
                    if read_only:
                        conn = conn.execution_options(**READ_ONLY)
                    elif single and self.dialect.autocommit_single:
                        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                    with conn.begin():
                        return fn(conn, *args, **kwargs)
            except Exception as exc:
                if attempt == attempts or not is_retryable(exc):
                    raise
                delay = min(1.0, 0.01 * 2 ** attempt) * (0.5 + random.random())
                log.debug("transaction %s lost a lock race (%s); retry %d in %.3fs",
                          getattr(fn, "__name__", fn), exc.__class__.__name__, attempt, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def q(self, statement: str, /, **kwargs: Any) -> Any:
        """Run the named statement from ``queries`` with this store's tables (and dialect if it takes one)."""
        fn = getattr(queries, statement)
        if "d" in fn.__code__.co_varnames[:fn.__code__.co_argcount]:
            return self.run(fn, self.t, self.dialect, **kwargs)
        return self.run(fn, self.t, **kwargs)

    def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self.run(fn, *args, read_only=True, **kwargs)

    def ping(self) -> None:
        """Raise if the database cannot be reached (kombu retries connects with backoff)."""
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    # ------------------------------------------------------------------ schema

    @property
    def creates_tables(self) -> bool:
        if self.options.create_tables is not None:
            return self.options.create_tables
        return self.dialect.name == "sqlite"

    def ensure_schema(self) -> None:
        """Create missing tables (SQLite by default) or say how to, once per process."""
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            if self.creates_tables:
                self._run(lambda conn: self.t.metadata.create_all(conn))
            elif not inspect(self.engine).has_table(self.t.processes.name):
                raise SchemaMissingError(
                    f"the celery_sqlbackend tables ({self.t.prefix}*) do not exist in "
                    f"{self.engine.url.render_as_string(hide_password=True)}; create them with "
                    "`celery -A yourapp sqlq migrate` (or set broker_transport_options="
                    "{'create_tables': True})")
            self._schema_ready = True

    def create_all(self) -> None:
        self._run(lambda conn: self.t.metadata.create_all(conn))
        self._schema_ready = True


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
