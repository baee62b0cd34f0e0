"""The test harness itself: engine fixtures, row inspection, polling and worker processes.

Nothing here touches the transport, so a failure points at the test infrastructure.
"""
from __future__ import annotations

import sys
import time

import pytest

from tests.harness import CeleryWorker, process_state, rows, wait_until, write_app
from tests.support import engines


def test_pg_db_url_is_a_fresh_writable_database(pg_db_url):
    assert pg_db_url.startswith("postgresql+psycopg://")
    assert rows(pg_db_url, "SELECT 1") == [(1,)]
    assert rows(pg_db_url, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]
    rows(pg_db_url, "CREATE TABLE t (id int primary key)")
    rows(pg_db_url, "INSERT INTO t VALUES (1), (2)")
    assert rows(pg_db_url, "SELECT id FROM t ORDER BY id") == [(1,), (2,)]


def test_pg_db_url_gives_each_test_its_own_database(pg_db_url, pg_url):
    mine = pg_db_url.rsplit("/", 1)[1]
    assert rows(pg_db_url, "SELECT current_database()") == [(mine,)]
    assert mine != pg_url.rsplit("/", 1)[1]


def test_mysql_db_url_is_a_fresh_writable_database(mysql_db_url, mysql_url):
    assert mysql_db_url.startswith("mysql+pymysql://")
    mine = mysql_db_url.rsplit("/", 1)[1]
    assert rows(mysql_db_url, "SELECT DATABASE()") == [(mine,)]
    assert mine != mysql_url.rsplit("/", 1)[1]
    assert rows(mysql_db_url, "SELECT count(*) FROM information_schema.tables WHERE table_schema = :s",
                {"s": mine}) == [(0,)]
    assert rows(mysql_db_url, "SELECT @@innodb_flush_log_at_trx_commit") == [(1,)]


def test_a_mysql_database_is_dropped_even_with_a_transaction_left_open_in_it(mysql_url):
    from sqlalchemy import create_engine, text

    with engines.fresh_database("mysql", mysql_url) as url:
        rows(url, "CREATE TABLE t (id int primary key) ENGINE=InnoDB")
        leaked = create_engine(url).connect()   # a test that forgot its connection, mid-transaction
        leaked.execute(text("INSERT INTO t VALUES (1)"))
        name = url.rsplit("/", 1)[1]
        started = time.monotonic()
    assert time.monotonic() - started < 30, "DROP DATABASE waited for the open transaction"
    assert rows(mysql_url, "SELECT count(*) FROM information_schema.schemata WHERE schema_name = :n",
                {"n": name}) == [(0,)]
    leaked.invalidate()


def test_engine_selection(monkeypatch):
    monkeypatch.delenv("SQLQ_TEST_ENGINES", raising=False)
    assert engines.selected_engines() == ("sqlite", "postgres", "mysql")
    monkeypatch.setenv("SQLQ_TEST_ENGINES", " MySQL,sqlite ")
    assert engines.selected_engines() == ("sqlite", "mysql")
    monkeypatch.setenv("SQLQ_TEST_ENGINES", "sqlite,oracle")
    with pytest.raises(ValueError, match="unknown engine.*oracle.*choose from sqlite, postgres, mysql"):
        engines.selected_engines()


def test_db_url_runs_on_every_engine(db_url):
    rows(db_url, "CREATE TABLE t (id integer primary key)")
    assert rows(db_url, "INSERT INTO t (id) VALUES (:id)", {"id": 7}) == []
    # Each call is its own engine and transaction, so this also proves rows() commits.
    assert rows(f"sqlq+{db_url}", "SELECT id FROM t") == [(7,)]


def test_wait_until_returns_the_truthy_value():
    start = time.monotonic()
    assert wait_until(lambda: time.monotonic() - start > 0.1 and "done", timeout=5) == "done"


def test_wait_until_times_out_with_a_clear_message():
    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"timed out after 0.2s waiting for the moon \(last: 0\)"):
        wait_until(lambda: 0, timeout=0.2, interval=0.01, message="the moon")
    assert time.monotonic() - start < 2


def test_wait_until_can_ignore_errors_until_the_deadline():
    with pytest.raises(AssertionError, match="KeyError"):
        wait_until(lambda: {}["missing"], timeout=0.1, ignore=(KeyError,))
    with pytest.raises(KeyError):
        wait_until(lambda: {}["missing"], timeout=0.1)


def test_write_app_produces_an_importable_module(tmp_path, sqlite_url, monkeypatch):
    write_app(tmp_path, f"sqlq+{sqlite_url}", result_backend=f"sqlq+{sqlite_url}",
              extra_conf={"task_acks_late": True, "broker_transport_options": {"polling_interval": 0.05}},
              tasks_source="""
                  @app.task
                  def add(x, y):
                      return x + y
              """)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("testapp", None)
    import testapp

    try:
        assert testapp.app.conf.broker_url == f"sqlq+{sqlite_url}"
        assert testapp.app.conf.task_acks_late is True
        assert testapp.add(2, 3) == 5
    finally:
        sys.modules.pop("testapp", None)


def test_worker_that_cannot_import_its_app_fails_fast_with_its_log(tmp_path):
    with CeleryWorker(tmp_path, app="no_such_module") as worker:
        with pytest.raises(AssertionError, match="before ready"):
            worker.wait_ready(timeout=60)
        assert worker.wait_exit(10) != 0
        assert "no_such_module" in worker.log_text()


def test_worker_lifecycle_signals(tmp_path, spawn_worker):
    # memory:// keeps the transport under development out of the harness's own test.
    write_app(tmp_path, "memory://", tasks_source="""
        @app.task
        def noop():
            return None
    """)
    worker = spawn_worker(tmp_path, pool="prefork", concurrency=2, queues=["a", "b"])
    assert "ready." in worker.log_text()
    assert len(wait_until(lambda: len(worker.children()) == 2 and worker.children(), 10,
                          message="two pool processes")) == 2
    worker.stop()
    assert wait_until(lambda: _state(worker.pid) == "T", 5, message="worker stopped")
    worker.cont()
    assert wait_until(lambda: _state(worker.pid) in ("S", "R"), 5, message="worker running again")
    worker.term()
    assert worker.wait_exit(30) == 0
    assert "a" in worker.log_text() and "noop" in worker.log_text()


def test_kill_group_leaves_no_process_behind(tmp_path):
    write_app(tmp_path, "memory://")
    with CeleryWorker(tmp_path, concurrency=2) as worker:
        worker.wait_ready()
        kids = wait_until(lambda: len(worker.children()) == 2 and worker.children(), 10)
        worker.kill_group()
        assert worker.wait_exit(10) == -9
    for pid in kids:
        assert wait_until(lambda: _state(pid) in (None, "Z"), 5, message=f"pool process {pid} gone")


def _state(pid: int):
    return process_state(pid)
