"""The worker pools the README lists, each in a real ``celery worker``, on every engine.

``-P eventlet`` on PostgreSQL needs psycopg to wait cooperatively (psycopg
detects gevent by itself, not eventlet): ``import celery_sqlbackend`` selects
psycopg's ``wait_select`` under eventlet, so it works out of the box.
"""
from __future__ import annotations

import importlib.util
from collections import Counter

import pytest
from celery import chord, group

from .conftest import HERE, runs

POOLS = ["prefork", "threads", "solo", "gevent", "eventlet"]


@pytest.mark.parametrize("pool", POOLS)
def test_pool_runs_tasks_groups_and_chords(pool, stack, tmp_path, spawn_worker):
    if pool in ("gevent", "eventlet") and importlib.util.find_spec(pool) is None:
        pytest.fail(f"{pool} is not installed: the test extra installs it")
    module, runs_file, env = stack
    worker = spawn_worker(tmp_path, app="stackapp", app_dir=HERE, pool=pool,
                          concurrency=1 if pool == "solo" else 4, env=env, ready_timeout=60)
    sent = [module.record.delay(f"t{i}") for i in range(40)]
    assert [r.get(timeout=60) for r in sent] == [f"t{i}" for i in range(40)], worker.output()
    assert set(Counter(runs(runs_file)).values()) == {1}
    assert group(module.add.s(i, i) for i in range(10)).delay().get(timeout=60) == [2 * i for i in range(10)]
    assert chord(module.add.s(i, 0) for i in range(5))(module.tsum.s()).get(timeout=60) == 10
    worker.term()
    assert worker.wait_exit(60) == 0, worker.output()
    log = worker.log_text()
    assert "Traceback" not in log, worker.output()
