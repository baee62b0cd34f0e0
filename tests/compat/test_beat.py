"""``celery worker --beat`` on SQLite: the embedded beat (a forked process that closes the file
descriptors it inherited) sends its periodic task through fresh connections of its own, and ends
with the worker."""
from __future__ import annotations

import os

import pytest

from tests.harness import process_state, rows, wait_until

from .conftest import HERE, import_stackapp, runs


@pytest.fixture
def beat_stack(sqlite_url, tmp_path, monkeypatch):
    # The prefix as an app setting: beat, a process of its own, must see it too.
    yield from import_stackapp(sqlite_url, tmp_path, monkeypatch, prefix="beat_", STACK_BEAT_EVERY="0.5")


def _alive(pid: int) -> bool:
    return process_state(pid) not in (None, "Z")


def test_worker_with_embedded_beat_on_sqlite(beat_stack, sqlite_url, tmp_path, spawn_worker):
    module, runs_file, env = beat_stack
    worker = spawn_worker(tmp_path, app="stackapp", app_dir=HERE, concurrency=1, env=env, ready_timeout=60,
                          extra_args=["--beat", "-s", env["STACK_BEAT_FILE"]])
    children = wait_until(lambda: len(worker.children()) >= 2 and worker.children(), timeout=20,
                          message="the pool process and the beat process")
    wait_until(lambda: runs(runs_file).count("beat") >= 3, timeout=30,
               message=f"beat's periodic task to run three times\n{worker.output()}")
    assert rows(sqlite_url, "select count(*) from beat_jobs where task_name = 'stack.record'")[0][0] >= 3
    log = worker.log_text()
    assert "locking protocol" not in log and "database is locked" not in log, worker.output()

    worker.term()
    assert worker.wait_exit(60) == 0, worker.output()
    wait_until(lambda: not any(_alive(pid) for pid in children), timeout=10,
               message=f"the beat and pool processes {children} to end with the worker")
    assert os.path.exists(env["STACK_BEAT_FILE"]) or any(p.name.startswith("celerybeat") for p in tmp_path.iterdir())
