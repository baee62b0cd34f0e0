"""A child forked while another thread writes to SQLite can still write (celery_sqlbackend.store.fork_gate).

The first test is the failure the gate exists for, with plain ``sqlite3``: the
child inherits the parent's in-memory note that a connection of "its"
process holds the WAL write lock, and waits out its busy timeout although no
process holds that lock.  The second forks with the same timing through a
guarded engine: the fork waits for the transaction, and the child writes.
"""
from __future__ import annotations

import os
import sqlite3
import threading

import pytest
import sqlalchemy as sa

from celery_sqlbackend.store import fork_gate
from celery_sqlbackend.store.engine import get_engine

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() only")

HOLD_SECONDS = 0.3  # how long the other thread's write transaction lasts (the scenario, not a wait)


def _child_writes(path: str) -> bool:
    """In a forked child: can a new connection write within 2 s?"""
    conn = sqlite3.connect(path, isolation_level=None, timeout=2)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t VALUES (2)")
        conn.execute("COMMIT")
        return True
    except sqlite3.OperationalError:
        return False


def _fork_and_write(path: str, *, after_fork=lambda: None) -> bool:
    pid = os.fork()
    if pid == 0:
        os._exit(0 if _child_writes(path) else 1)
    after_fork()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def test_without_the_gate_a_child_forked_during_a_write_cannot_write(tmp_path):
    path = str(tmp_path / "raw.db")
    setup = sqlite3.connect(path, isolation_level=None)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute("CREATE TABLE t(x)")
    began, release = threading.Event(), threading.Event()

    def writer():
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t VALUES (1)")
        began.set()
        release.wait(10)
        conn.execute("COMMIT")
        conn.close()

    thread = threading.Thread(target=writer)
    thread.start()
    assert began.wait(10)
    # The parent commits right after the fork; the child still cannot write.
    assert _fork_and_write(path, after_fork=release.set) is False
    thread.join(10)


def test_a_fork_waits_for_another_threads_sqlite_transaction_and_the_child_writes(tmp_path):
    path = str(tmp_path / "gated.db")
    engine = get_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t(x)")
    began = threading.Event()
    committed = threading.Event()

    def writer():
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO t VALUES (1)"))
            began.set()
            threading.Event().wait(HOLD_SECONDS)
        committed.set()

    thread = threading.Thread(target=writer)
    thread.start()
    assert began.wait(10)
    assert _fork_and_write(path) is True
    assert committed.is_set(), "the fork did not wait for the transaction"
    thread.join(10)
    with engine.connect() as conn:
        assert sorted(conn.execute(sa.text("SELECT x FROM t")).scalars()) == [1, 2]


def test_after_a_fork_parent_and_child_both_get_connections(tmp_path):
    engine = get_engine(f"sqlite:///{tmp_path / 'after.db'}")
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    pid = os.fork()
    if pid == 0:
        with engine.connect() as conn:  # the child's gate is open, its pool fresh
            os._exit(0 if conn.exec_driver_sql("SELECT 1").scalar() == 1 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert fork_gate._forking_thread is None
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT 1").scalar() == 1


def test_a_fork_waits_for_a_connection_another_thread_is_opening(tmp_path):
    """Opening a connection (``sqlite3.connect`` and its PRAGMAs) takes SQLite's process-wide
    mutexes: a child forked in that window inherited them held and hung in its own connect."""
    import time

    from tests.harness import wait_until

    path = str(tmp_path / "opening.db")
    sqlite3.connect(path).execute("CREATE TABLE t(x)")
    engine = get_engine(f"sqlite:///{path}")
    engine.connect().close()    # (the engine's first connect runs under a lock of its own)
    engine.dispose()
    opening, release = threading.Event(), threading.Event()

    @sa.event.listens_for(engine, "connect")
    def held_open(_dbapi_conn, _record):   # (the window, made long enough to fork into)
        opening.set()
        release.wait(10)

    opener = threading.Thread(target=lambda: engine.connect().close())
    opener.start()
    assert opening.wait(10)
    outcome = []
    forker = threading.Thread(target=lambda: outcome.append((_fork_and_write(path), time.monotonic())))
    forker.start()
    wait_until(lambda: fork_gate._forking_thread is not None, 10, 0.01, "the fork to be pending")
    assert not outcome, "the fork went ahead while a connection was being opened"
    released_at = time.monotonic()
    release.set()
    forker.join(30)
    opener.join(10)
    [(wrote, forked_after)] = outcome
    assert wrote and forked_after > released_at
