"""Lost lock races are retried and counted: a real InnoDB deadlock, and the log's summary line.

The deadlock is made the classic way, two transactions taking two rows in
opposite orders, one of them the store's own; the other touches more rows
first, so InnoDB (which rolls back the lighter transaction) picks the
store's, which must then run again and win.
"""
from __future__ import annotations

import logging
import threading

import pytest
from sqlalchemy import update

from celery_sqlbackend.options import Options
from celery_sqlbackend.store import Store, lock_retries, utcnow


@pytest.fixture
def store(mysql_db_url):
    store = Store(mysql_db_url, Options(create_tables=True))
    store.ensure_schema()
    for queue in ("a", "b", "c", "d", "e"):
        store.queues.pause(queue, now=utcnow())
    yield store
    store.engine.dispose()


def _touch(conn, store, queue):
    p = store.t.pauses
    conn.execute(update(p).where(p.c.queue_name == queue).values(created_at=utcnow()))


def test_a_deadlock_is_retried_and_counted(store, caplog):
    before = lock_retries.snapshot().get("deadlock", 0)
    took_a, attempts, other_error = threading.Event(), [], []
    other = store.engine.connect()
    other_txn = other.begin()
    for queue in ("b", "c", "d", "e"):     # heavier than the store's transaction: InnoDB spares it
        _touch(other, store, queue)

    def crossing():
        took_a.wait(10)
        try:
            _touch(other, store, "a")      # waits for the store's transaction: a cycle
            other_txn.commit()
        except Exception as exc:           # (reported by the assertion below)
            other_error.append(exc)
            other_txn.rollback()

    thread = threading.Thread(target=crossing)
    thread.start()

    def ours(conn):
        attempts.append(1)
        _touch(conn, store, "a")
        took_a.set()
        _touch(conn, store, "b")           # held by the other transaction
        return len(attempts)

    with caplog.at_level(logging.DEBUG, logger="celery_sqlbackend.store"):
        result = store.run(ours)
    thread.join(20)
    other.close()
    assert other_error == []
    assert result == 2, "the store's transaction was the deadlock victim and ran again"
    assert lock_retries.snapshot().get("deadlock", 0) == before + 1
    assert any("lost a lock race (deadlock)" in r.getMessage() for r in caplog.records)


def test_a_busy_minute_logs_one_warning(caplog, monkeypatch):
    monkeypatch.setattr(lock_retries, "_window", lock_retries.Counter())
    monkeypatch.setattr(lock_retries, "_window_start", lock_retries.time.monotonic())
    with caplog.at_level(logging.DEBUG, logger="celery_sqlbackend.store"):
        for i in range(lock_retries.WARN_PER_MINUTE * 2):
            lock_retries.record("deadlock" if i % 2 else "lock wait timeout", "claim", 1, 0.01)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "20 transactions retried" in warnings[0].getMessage()
    assert "deadlock 10, lock wait timeout 10" in warnings[0].getMessage()
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(debug) == lock_retries.WARN_PER_MINUTE * 2
