"""PostgreSQL behind PgBouncer in transaction pooling mode: broker, results and ``celery sqlq`` through it.

The run's PgBouncer (``pgbouncer_db``) keeps a few server connections per database, so every client
shares them: a server-side prepared statement, a session ``SET`` or a ``LISTEN`` sent by one client would
land on a connection another client gets next. The URL declares the mode (``?sqlq_pool_mode=transaction``,
``celery_sqlbackend.store.pooler``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import psycopg
import pytest
from sqlalchemy.engine import make_url

from celery_sqlbackend.errors import ConfigurationError
from celery_sqlbackend.store import pooler
from tests.harness import REPO, rows, wait_until, write_app
from tests.support.pgbouncer import POOL_SIZE

TASKS = """
    @app.task
    def add(x, y):
        return x + y

    @app.task
    def total(values):
        return sum(values)
"""


def _sqlq(directory, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(directory), str(REPO)])}
    out = subprocess.run([sys.executable, "-m", "celery", "-A", "testapp", "sqlq", *args], cwd=directory, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"celery sqlq {' '.join(args)} failed ({out.returncode}):\n{out.stdout}{out.stderr}"
    return out


def _app(tmp_path, broker: str, **conf):
    write_app(tmp_path, f"sqlq+{broker}", result_backend=f"sqlq+{broker}", tasks_source=TASKS,
              extra_conf={"broker_transport_options": {"polling_interval": 0.05}, **conf})
    sys.path.insert(0, str(tmp_path))
    sys.modules.pop("testapp", None)
    import importlib
    return importlib.import_module("testapp")


@pytest.fixture
def app_module():
    yield _app
    sys.modules.pop("testapp", None)


def _server_settings_through(bounced_url: str) -> set[str]:
    """``enable_sort`` as every server connection of the pool has it: POOL_SIZE clients, each holding its
    own transaction at once, so each has a server connection of its own."""
    u = make_url(bounced_url)
    conns = [psycopg.connect(host=u.host, port=u.port, user=u.username, password=u.password, dbname=u.database,
                             prepare_threshold=None) for _ in range(POOL_SIZE)]
    try:
        return {conn.execute("SHOW enable_sort").fetchone()[0] for conn in conns}   # (each opens a transaction)
    finally:
        for conn in conns:
            conn.close()


def test_workers_results_and_sqlq_commands_through_pgbouncer(tmp_path, pgbouncer_db, app_module, spawn_worker):
    through = pgbouncer_db.through
    app = app_module(tmp_path, through)
    migrated = json.loads(_sqlq(tmp_path, "migrate", "--json").stdout)
    assert migrated["from"] is None and migrated["to"], migrated
    assert rows(pgbouncer_db.direct, "select count(*) from sqlq_processes") == [(0,)]   # the tables exist

    workers = [spawn_worker(tmp_path, concurrency=2, pool="prefork") for _ in range(2)]
    from celery import chord, group
    n = 300
    results = group(app.add.s(i, i) for i in range(n)).apply_async()
    assert results.get(timeout=120) == [2 * i for i in range(n)]
    singles = [app.add.delay(i, 1) for i in range(50)]          # one-statement publishes, each its own transaction
    assert [r.get(timeout=60) for r in singles] == [i + 1 for i in range(50)]
    assert chord(app.add.s(i, 0) for i in range(20))(app.total.s()).get(timeout=60) == sum(range(20))

    wait_until(lambda: rows(pgbouncer_db.direct, "select count(*) from sqlq_jobs where finished_at is null")
               == [(0,)], timeout=30, message="every job recorded finished")
    assert rows(pgbouncer_db.direct, "select count(*) from sqlq_failed_executions") == [(0,)]
    assert rows(pgbouncer_db.direct, "select count(*), max(deliveries) from sqlq_jobs") == [(n + 50 + 21, 1)]

    status = json.loads(_sqlq(tmp_path, "status", "--json").stdout)
    assert len(status["processes"]) == 2, status["processes"]
    app.add.apply_async((1, 1), countdown=3600)
    assert json.loads(_sqlq(tmp_path, "scheduled", "--json").stdout)["total"] == 1

    for worker in workers:
        text = worker.log_text()
        assert worker.alive(), worker.output()
        assert "prepared statement" not in text, worker.output()
        assert "sqlq_pool_mode=transaction" in text and "polls" in text, worker.output()   # the one line
        assert text.count("cannot carry LISTEN") <= 3, worker.output()   # once per process, not per poll
    # No session setting was left on a server connection that other clients get next.
    assert _server_settings_through(through) == {"on"}
    # Nothing LISTENed through the pooler (it would hold on to a server connection no one reads).
    assert rows(pgbouncer_db.direct, "select count(*) from pg_stat_activity where datname = current_database() "
                                     "and query ilike 'listen%'") == [(0,)]


def test_listen_url_beside_pgbouncer_wakes_workers(tmp_path, pgbouncer_db, app_module, spawn_worker):
    app = app_module(tmp_path, pgbouncer_db.through, sqlq_listen_url=pgbouncer_db.direct)
    _sqlq(tmp_path, "migrate")
    worker = spawn_worker(tmp_path, concurrency=1, pool="prefork")
    wait_until(lambda: rows(pgbouncer_db.direct, "select count(*) from pg_stat_activity where datname = "
                                                 "current_database() and query ilike 'listen%'") != [(0,)],
               timeout=30, message="the worker's LISTEN connection, made directly to PostgreSQL")
    assert app.add.delay(2, 3).get(timeout=30) == 5
    assert "cannot carry LISTEN" not in worker.log_text(), worker.output()


@pytest.mark.parametrize("mode, problem", [("statement", "not supported"), ("transactoin", "not a pool mode")])
def test_pool_modes_that_cannot_work_are_refused_with_what_to_write(mode, problem):
    with pytest.raises(ConfigurationError, match=problem):
        pooler.pool_mode(f"postgresql+psycopg://u@h/db?sqlq_pool_mode={mode}")


def test_the_pool_mode_parameter_never_reaches_the_driver():
    url, extra = pooler.engine_arguments("postgresql+psycopg://u:secret@h:6432/db?sqlq_pool_mode=transaction")
    assert "sqlq_pool_mode" not in url.query and extra == {"connect_args": {"prepare_threshold": None}}
    assert pooler.engine_arguments("postgresql+psycopg://u@h/db")[1] == {}
    assert pooler.per_transaction(("SET enable_sort = off",)) == ("SET LOCAL enable_sort = off",)
