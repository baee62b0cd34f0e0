"""``enqueue_in``: jobs written in the application's transaction, run by a real worker only once it commits."""
from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest
from celery import chain, group
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

import celery_sqlbackend as sqlq
from celery_sqlbackend.options import Options
from celery_sqlbackend.store import Store
from tests.enqueue.conftest import labels, load_app, ran_at
from tests.harness import rows, wait_until


def _engine(db_url):
    return create_engine(db_url, poolclass=NullPool)


def test_commit_runs_the_jobs_and_rollback_leaves_nothing(app_dir, db_url, spawn_worker):
    directory, app, runs = app_dir
    engine = _engine(db_url)
    Store(db_url, Options(create_tables=True)).create_all()    # as a worker leaves it (SQLite: in WAL mode)
    with engine.begin() as conn:
        conn.execute(text("create table orders (id integer primary key)"))
    with Session(engine) as session, session.begin():
        # The application writes first (on SQLite its transaction now holds the write lock), then
        # publishes for the first time in this process (connect, declare the queue: all through it).
        session.execute(text("insert into orders (id) values (1)"))
        with sqlq.enqueue_in(session):
            app.record.delay("committed")
            app.record.apply_async(("later",), countdown=1)
            app.record.apply_async(("high",), priority=9)
    with pytest.raises(RuntimeError):
        with Session(engine) as session, session.begin():
            with sqlq.enqueue_in(session):
                app.record.delay("rolled-back")
                app.record.apply_async(("rolled-back-eta",), countdown=1)
            raise RuntimeError("the application's own failure")
    assert rows(db_url, "select count(*) from sqlq_jobs") == [(3,)]
    assert rows(db_url, "select count(*) from sqlq_scheduled_executions") == [(1,)]
    assert rows(db_url, "select count(*) from orders") == [(1,)]
    spawn_worker(directory)
    wait_until(lambda: len(labels(runs)) >= 3, 60, message="the three committed jobs ran")
    assert sorted(labels(runs)) == ["committed", "high", "later"]
    assert labels(runs)[0] == "high"    # the priority went through the caller's connection too
    engine.dispose()


def test_a_worker_does_not_see_an_uncommitted_job(app_dir, db_url, spawn_worker):
    directory, app, runs = app_dir
    app.record.delay("warm-up")      # creates the tables; the worker below runs it first
    spawn_worker(directory)
    wait_until(lambda: "warm-up" in labels(runs), 60, message="warm-up ran")
    engine = _engine(db_url)
    with engine.connect() as conn:
        trans = conn.begin()
        with sqlq.enqueue_in(conn):
            app.record.delay("uncommitted")
        # Another connection (a worker's) does not see it...
        assert rows(db_url, "select count(*) from sqlq_ready_executions") == [(0,)]
        if engine.dialect.name != "sqlite":   # (SQLite: one writer at a time; the open transaction is it)
            # ... and a worker claims a job committed after it, never the older uncommitted one.
            app.record.delay("committed-after")
            wait_until(lambda: "committed-after" in labels(runs), 60, message="the later committed job ran")
            assert "uncommitted" not in labels(runs)
        trans.commit()
    wait_until(lambda: "uncommitted" in labels(runs), 60, message="the job ran once committed")
    engine.dispose()


def test_groups_chains_nesting_and_countdown_inside_the_block(app_dir, db_url, spawn_worker):
    directory, app, runs = app_dir
    engine = _engine(db_url)
    with engine.begin() as conn:
        with sqlq.enqueue_in(conn):
            g = group(app.add.s(i, i) for i in range(5)).apply_async()
            c = chain(app.add.s(1, 2), app.add.s(10)).apply_async()
            with sqlq.enqueue_in(conn):     # nested: the same transaction
                inner = app.add.delay(20, 22)
            eta = app.add.apply_async((1, 1), eta=datetime.now(timezone.utc) + timedelta(seconds=1))
        assert rows(db_url, "select count(*) from sqlq_jobs") == [(0,)]   # nothing visible before commit
    assert rows(db_url, "select count(*) from sqlq_jobs") == [(8,)]
    spawn_worker(directory, concurrency=2)
    assert g.get(timeout=60) == [0, 2, 4, 6, 8]
    assert c.get(timeout=60) == 13
    assert inner.get(timeout=60) == 42
    assert eta.get(timeout=60) == 2
    engine.dispose()


def test_a_connection_to_another_database_is_a_clear_error(app_dir, tmp_path):
    _, app, _ = app_dir
    other = create_engine(f"sqlite:///{tmp_path}/other.sqlite3")
    with other.begin() as conn, sqlq.enqueue_in(conn):
        with pytest.raises(sqlq.WrongDatabaseError, match="broker's database"):
            app.record.delay("lost")
        assert conn.execute(text("select 1")).scalar() == 1   # the caller's transaction is untouched
    other.dispose()


def test_notify_at_commit_wakes_an_idle_postgres_worker(tmp_path, pg_db_url, monkeypatch, spawn_worker):
    """The worker polls every 30 s; NOTIFY, sent inside the transaction, is delivered by the server at commit."""
    runs = tmp_path / "runs.txt"
    monkeypatch.setenv("RUNS_FILE", str(runs))
    monkeypatch.syspath_prepend(str(tmp_path))
    app = load_app(tmp_path, pg_db_url, polling_interval=30.0)
    app.record.delay("first")    # (creates the tables)
    spawn_worker(tmp_path)
    wait_until(lambda: "first" in labels(runs), 60, message="first job ran")
    app.record.delay("listening")      # ran well before 30 s: the worker is waiting on LISTEN
    wait_until(lambda: "listening" in labels(runs), 25, message="a NOTIFY-woken job ran")
    engine = _engine(pg_db_url)
    with engine.connect() as conn:
        with conn.begin():
            with sqlq.enqueue_in(conn):
                app.record.delay("woken")
        committed = time.time()
    started = wait_until(lambda: ran_at(runs, "woken"), 25, message="the job committed in a transaction ran")
    latency = started - committed
    print(f"wake latency after commit: {latency * 1000:.1f} ms (polling_interval 30 s)")
    assert latency < 10.0
    engine.dispose()
