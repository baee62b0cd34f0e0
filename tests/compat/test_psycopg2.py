"""PostgreSQL through psycopg2 alone: a plain ``postgresql://`` URL works, and LISTEN/NOTIFY wakes
an idle worker through psycopg2 (not the poll).

The worker's ``psycopg`` (3) is hidden by a package on its path that fails to import, so
everything it does goes through psycopg2, as in a deployment that has only psycopg2.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.harness import REPO, rows, wait_until

from .conftest import HERE, import_stackapp

HIDE = "raise ImportError('{name} is hidden by tests/compat/test_psycopg2.py')\n"


def _hide(directory, *names):
    for name in names:
        (directory / name).mkdir(parents=True)
        (directory / name / "__init__.py").write_text(HIDE.format(name=name))
    return directory


@pytest.fixture
def psycopg2_only(pg_db_url, tmp_path, monkeypatch):
    pytest.importorskip("psycopg2", reason="the test extra installs psycopg2-binary")
    plain = pg_db_url.replace("postgresql+psycopg://", "postgresql://")
    yield from import_stackapp(plain, tmp_path, monkeypatch)


def test_plain_url_and_notify_wakeups_through_psycopg2(psycopg2_only, pg_db_url, tmp_path, spawn_worker):
    module, runs_file, env = psycopg2_only
    hidden = _hide(tmp_path / "hidden", "psycopg")
    # A poll every 20 s: a job that starts within 10 s was woken by NOTIFY.
    env = {**env, "STACK_POLL": "20", "PYTHONPATH": os.pathsep.join([str(hidden), str(HERE), str(REPO)])}
    worker = spawn_worker(tmp_path, app="stackapp", app_dir=HERE, concurrency=1, env=env, ready_timeout=60,
                          extra_args=["--without-heartbeat"])
    # ... once its LISTEN connection is up (psycopg2 here: psycopg is hidden from the worker). A claim
    # round that ran before the consumer started waits one poll interval before it first LISTENs.
    wait_until(lambda: rows(pg_db_url, "select count(*) from pg_stat_activity where datname = current_database() "
                                       "and query like 'LISTEN%'")[0][0] >= 1,
               timeout=60, message=f"the worker's LISTEN connection\n{worker.output()}")
    sent = time.time()
    assert module.record.delay("woken").get(timeout=60) == "woken"
    [started] = [float(line.split()[2]) for line in runs_file.read_text().splitlines() if line.startswith("woken ")]
    assert started - sent < 10, (started - sent, worker.output())
    log = worker.log_text()
    assert "psycopg is hidden" not in log and "LISTEN connection failed" not in log, worker.output()


def test_no_postgres_driver_names_the_extras(tmp_path):
    hidden = _hide(tmp_path / "hidden", "psycopg", "psycopg2")
    code = ("from celery_sqlbackend.store.engine import get_engine\n"
            "get_engine('postgresql://user:secret@127.0.0.1:1/db')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(hidden), str(REPO)])})
    assert out.returncode != 0
    assert "ConfigurationError" in out.stderr and "celery-sqlbackend[postgres2]" in out.stderr, out.stderr
    assert "celery-sqlbackend[postgres]" in out.stderr and "secret" not in out.stderr, out.stderr
