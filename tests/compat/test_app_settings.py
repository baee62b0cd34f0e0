"""``sqlq_<option>`` settings reach every process that uses the app, not only workers.

The app gives its table prefix only as ``app.conf.sqlq_table_prefix``: the
producer (this test process), the worker, the result backend and
``celery sqlq`` must all use the prefixed tables.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from sqlalchemy import create_engine, inspect

from tests.harness import REPO, rows, wait_until

from .conftest import HERE, runs


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_table_prefix_setting_reaches_producer_worker_backend_and_cli(prefixed_stack, db_url, tmp_path,
                                                                    spawn_worker):
    module, runs_file, env = prefixed_stack
    # The producer publishes before any worker ran: it must create and use pfx_ tables itself.
    sent = [module.record.delay(f"p{i}") for i in range(5)]
    assert rows(db_url, "select count(*) from pfx_jobs") == [(5,)]
    spawn_worker(tmp_path, app="stackapp", app_dir=HERE, concurrency=1, env=env, ready_timeout=60)
    assert [r.get(timeout=30) for r in sent] == [f"p{i}" for i in range(5)]
    assert sorted(runs(runs_file)) == [f"p{i}" for i in range(5)]
    assert rows(db_url, "select count(*) from pfx_results where status = 'SUCCESS'") == [(5,)]
    wait_until(lambda: rows(db_url, "select count(*) from pfx_jobs where finished_at is null") == [(0,)],
               timeout=10, message="the jobs recorded finished")
    tables = _tables(db_url)
    assert not {t for t in tables if t.startswith("sqlq_")}, sorted(tables)

    # `celery sqlq` of the same app reads the prefixed tables.
    cli_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)])}
    out = subprocess.run([sys.executable, "-m", "celery", "-A", "stackapp", "sqlq", "status", "--json"],
                         cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    names = [p["name"] for p in status["processes"]]
    assert len(names) == 1 and names[0].startswith("w"), status
