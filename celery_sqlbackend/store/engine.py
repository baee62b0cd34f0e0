"""Engines: one per database URL per process, safe across fork and threads.

* SQLite gets WAL, ``synchronous=NORMAL`` and a busy timeout on every
  connection, and every write transaction starts with ``BEGIN IMMEDIATE``.
  A deferred transaction that reads and then writes cannot wait for the lock:
  SQLite refuses the upgrade at once with "database is locked", whatever the
  busy timeout says.  Taking the write lock up front turns contention into a
  short, bounded wait.  Read-only work opts out with ``READ_ONLY``.
* After ``fork()`` the child drops the pool it inherited *without closing*
  the parent's sockets (``dispose(close=False)``), so prefork children can
  publish and store results on connections of their own.
* Before any ``fork()`` (prefork children, Celery's embedded beat, anything
  else) the parent waits until no other thread has a SQLite connection
  checked out, and closes the idle ones (:mod:`.fork_gate`).  SQLite keeps
  per-process state for every open database file (its locks and WAL index,
  each tied to a file descriptor); a child inherits that state: a write lock
  another thread held at the fork blocks every write of the child, and a
  child that closes the descriptors it inherited, as the embedded beat does,
  would find it pointing at closed or reused descriptors ("locking
  protocol").  With no SQLite connection open at the fork, the child starts clean.
* MySQL/MariaDB connections run at READ COMMITTED, with the lock wait bounded
  by the busy timeout.  Why: at InnoDB's default REPEATABLE READ every locking
  read and DELETE also locks the *gaps* of the index ranges it walks, so a
  claim's range lock on the poll index blocks the INSERT of a newly enqueued
  job behind it, the lock-order deadlock of Solid Queue's MySQL reports
  (rails/solid_queue #162, #229, #531).  READ COMMITTED takes record locks
  only; every statement here reads the rows it changes by primary key or
  under SKIP LOCKED, so it needs no gap locks.
* PyMySQL connections share one "preferred" TLS context per process
  (:mod:`.pymysql_tls`): PyMySQL 1.2 builds one per connection, 40 ms of CPU each.
* MariaDB/MySQL connections of the store take several statements per packet
  (``CLIENT_MULTI_STATEMENTS``, :mod:`.claim_packet`): the claim loop is one packet.
* Connections are checked out per operation, so acks arriving on billiard's
  result thread never share a connection with the claiming thread.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from ..errors import ConfigurationError
from ..urls import postgres_driver
from . import claim_packet, fork_gate, pooler, pymysql_tls
from .dialects import sends_statement_packets

#: Execution option for transactions that only read: on SQLite they begin
#: DEFERRED so that readers never queue behind the write lock.
READ_ONLY = {"sqlq_read_only": True}

_engines: dict[tuple[str, float], Engine] = {}
_lock = threading.Lock()


def get_engine(url: str, busy_timeout: float = 30.0) -> Engine:
    """The cached engine for ``url`` in this process."""
    key = (url, busy_timeout)
    engine = _engines.get(key)
    if engine is None:
        with _lock:
            engine = _engines.get(key)
            if engine is None:
                engine = _engines[key] = _create(url, busy_timeout)
    return engine


def get_autocommit_engine(url: str) -> Engine:
    """The cached autocommit engine for ``url``, whose pool does not ping on checkout.

    For one-statement publishes (``store.jobs.add`` on PostgreSQL): a ping is a
    round trip, as long as the statement itself.  A connection found dead
    fails the publish with a connection error; SQLAlchemy then drops the
    pool's older connections, and kombu's publish retry (Celery's
    ``task_publish_retry``) sends it again on a fresh one.
    """
    key = (url, -1.0)
    engine = _engines.get(key)
    if engine is None:
        with _lock:
            engine = _engines.get(key)
            if engine is None:
                parsed, extra = pooler.engine_arguments(url)
                engine = _engines[key] = pymysql_tls.install(create_engine(parsed, pool_size=5, max_overflow=10,
                                                                           isolation_level="AUTOCOMMIT", **extra))
    return engine


def _create(url: str, busy_timeout: float) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _create_sqlite(url, busy_timeout)
    if parsed.get_backend_name() == "postgresql":
        parsed = postgres_driver(parsed)
    try:
        if parsed.get_backend_name() in ("mysql", "mariadb"):
            return _create_mysql(url, busy_timeout)
        parsed, extra = pooler.engine_arguments(parsed)   # (a pooler in transaction mode: no prepared statements)
        return create_engine(parsed, pool_pre_ping=True, pool_size=5, max_overflow=10, **extra)
    except ImportError as exc:
        raise ConfigurationError(
            f"the database driver for {parsed.render_as_string(hide_password=True)!r} is not installed "
            f"({exc}); {_INSTALL_HINT.get(parsed.get_backend_name(), 'install the driver the URL names')}") from None


#: What to install, by backend, when the driver of a URL is missing.
_INSTALL_HINT = {
    "postgresql": "pip install 'celery-sqlbackend[postgres]' (psycopg 3, URL postgresql+psycopg://) or "
                  "'celery-sqlbackend[postgres2]' (psycopg2, URL postgresql+psycopg2://)",
    "mysql": "pip install 'celery-sqlbackend[mysql]' (mysqlclient, URL mysql+mysqldb://) or "
             "'celery-sqlbackend[pymysql]' (PyMySQL, URL mysql+pymysql://)",
}


def _create_mysql(url: str, busy_timeout: float) -> Engine:
    engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10,
                           isolation_level="READ COMMITTED")
    if sends_statement_packets(engine):
        claim_packet.enable(engine)   # (the claim loop's packet of statements; before pymysql_tls connects)
    pymysql_tls.install(engine)   # (PyMySQL >= 1.2 would build a TLS context per connection)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        cur = dbapi_conn.cursor()
        # (Whole seconds, at least 1: InnoDB's own unit.)
        cur.execute(f"SET SESSION innodb_lock_wait_timeout = {max(1, round(busy_timeout))}")
        cur.close()

    return engine


def _create_sqlite(url: str, busy_timeout: float) -> Engine:
    # Pooled: opening a connection costs four PRAGMAs.  Connections move
    # between threads (claims on one, acks on another) but are never used by
    # two at once, so check_same_thread is off.
    engine = create_engine(url, pool_size=5, max_overflow=10,
                           connect_args={"timeout": busy_timeout, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        # Let SQLAlchemy's BEGIN below be the only transaction control
        # (pysqlite's own implicit BEGIN is DEFERRED).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        _journal_mode_wal(cur, busy_timeout)
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        if conn.get_execution_options().get("sqlq_read_only"):
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return fork_gate.guard(engine)


def _journal_mode_wal(cur: Any, busy_timeout: float) -> None:
    """``PRAGMA journal_mode=WAL``, retried for up to ``busy_timeout`` while the file is locked.

    Why: while another connection switches a new file to WAL, SQLite answers this
    pragma "database is locked" at once, without waiting on the busy handler.
    Workers, beat and producers starting together on a new file met it
    (``tests/test_sqlite_open_race.py``).
    """
    deadline = time.monotonic() + busy_timeout
    pause = 0.002
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()
    # Keep the engine objects (stores hold them) but give each a fresh pool.
    for engine in list(_engines.values()):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork_in_child)
