"""A registered process on this host whose PID no longer runs it is pruned at once, not after
``alive_threshold``; ``celery sqlq prune --process NAME`` forces one out after confirmation.

Default settings (heartbeat 60 s, alive threshold 300 s), real prefork workers, SIGKILL.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
from celery import Celery

import celery_sqlbackend  # noqa: F401  (registers the sqlq transport)
from celery_sqlbackend import pid_identity
from celery_sqlbackend.errors import ProcessPrunedError
from tests.harness import REPO, CeleryWorker, rows, wait_until, write_app

TASKS = '''
import os, time

def _mark(path):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, (app.current_worker_task.request.hostname + "\\n").encode())
    finally:
        os.close(fd)

@app.task(name="t.early")
def early(path, seconds=120):
    _mark(path)
    time.sleep(seconds)

@app.task(name="t.late", acks_late=True)
def late(path, seconds=120):
    _mark(path)
    time.sleep(seconds)
'''

#: Only what every test needs; the liveness settings are the defaults.
OPTIONS = {"create_tables": True}


def _setup(tmp_path, db_url):
    url = f"sqlq+{db_url}"
    write_app(tmp_path, url, result_backend="sqlq://", extra_conf={
        "broker_transport_options": OPTIONS, "worker_prefetch_multiplier": 1,
        "broker_connection_retry_on_startup": True, "worker_enable_remote_control": False},
        tasks_source=TASKS)
    return Celery("producer", broker=url, backend="sqlq://", broker_transport_options=OPTIONS)


def _hosts(path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _start_both(tmp_path, db_url, producer):
    early_marks, late_marks = tmp_path / "early", tmp_path / "late"
    early = producer.send_task("t.early", args=[str(early_marks)], queue="main")
    late = producer.send_task("t.late", args=[str(late_marks)], queue="main")
    wait_until(lambda: _hosts(early_marks) and _hosts(late_marks), 30, 0.05, "both tasks to start")
    wait_until(lambda: rows(db_url, "SELECT count(*) FROM sqlq_claimed_executions WHERE acked_at IS NOT NULL")
               [0][0] == 1, 30, 0.1, "the early-ack job's start on record")
    return early, late, early_marks, late_marks


def test_a_killed_workers_jobs_recover_within_15s_of_a_new_worker_on_the_same_host(tmp_path, db_url):
    producer = _setup(tmp_path, db_url)
    a = CeleryWorker(tmp_path, hostname="a@%h", concurrency=2, queues="main")
    b = None
    try:
        a.wait_ready(60)
        early, late, early_marks, late_marks = _start_both(tmp_path, db_url, producer)
        a.kill_group()
        a.wait_exit(10)

        started = time.monotonic()
        b = CeleryWorker(tmp_path, hostname="b@%h", concurrency=2, queues="main")
        wait_until(lambda: any(h.startswith("b@") for h in _hosts(late_marks)), 15, 0.1,
                   "the acks_late job to run again on b")
        wait_until(lambda: rows(db_url, "SELECT error_class, error FROM sqlq_failed_executions"), 15, 0.1,
                   "the early-ack job to be failed")
        elapsed = time.monotonic() - started
        print(f"recovered {elapsed:.1f}s after starting b")   # (shown with -s: the README's measurement)
        assert elapsed <= 15, elapsed
        [(error_class, error)] = rows(db_url, "SELECT error_class, error FROM sqlq_failed_executions")
        assert error_class == "ProcessPrunedError"
        assert "no longer runs it" in error and "process start time" in error
        with pytest.raises(ProcessPrunedError):
            early.get(timeout=10)
        # The early-ack job never ran twice.
        assert [h for h in _hosts(early_marks)] == [h for h in _hosts(early_marks) if h.startswith("a@")]
        assert rows(db_url, "SELECT count(*) FROM sqlq_processes WHERE name LIKE 'a@%'") == [(0,)]
        assert "pruned dead process a@" in b.log_text()
    finally:
        a.close()
        if b is not None:
            b.close()
        producer.close()


def _freeze_between_writes(worker, db_url: str) -> None:
    """SIGSTOP the worker at a moment it holds no SQLite write lock.

    A process frozen inside a write transaction keeps SQLite's one write lock, and nobody can write
    until it runs again: that is SQLite, not the scenario here (a frozen worker and an operator's prune).
    """
    import sqlite3
    for _ in range(100):
        worker.stop()
        if not db_url.startswith("sqlite"):
            return
        probe = sqlite3.connect(db_url.split(":///", 1)[1], timeout=0.2, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            return
        except sqlite3.OperationalError:
            worker.cont()
        finally:
            probe.close()
    raise AssertionError("the worker always held the write lock when frozen")


def test_prune_process_forces_a_live_one_out_only_once_confirmed(tmp_path, db_url):
    producer = _setup(tmp_path, db_url)
    a = CeleryWorker(tmp_path, hostname="a@%h", concurrency=2, queues="main")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    name = f"a@{socket.gethostname()}"

    def prune(*args, stdin=""):
        return subprocess.run([sys.executable, "-m", "celery", "-A", "testapp", "sqlq", "prune", *args],
                              cwd=tmp_path, env=env, input=stdin, capture_output=True, text=True, timeout=60)
    try:
        a.wait_ready(60)
        early, late, _, _ = _start_both(tmp_path, db_url, producer)
        _freeze_between_writes(a, db_url)     # frozen, not dead: only an operator's decision prunes it

        assert prune().returncode == 0
        assert rows(db_url, "SELECT count(*) FROM sqlq_processes WHERE name = :n", {"n": name}) == [(1,)]
        refused = prune("--process", name, stdin="n\n")
        assert refused.returncode != 0 and "Aborted" in refused.stderr + refused.stdout
        assert rows(db_url, "SELECT count(*) FROM sqlq_processes WHERE name = :n", {"n": name}) == [(1,)]
        missing = prune("--process", "nobody@nowhere", "--yes")
        assert missing.returncode != 0 and "no registered process" in missing.stderr

        done = prune("--process", name, "--yes")
        assert done.returncode == 0, done.stderr
        assert "pruned 1 dead process" in done.stdout and "failed 1 job" in done.stdout
        assert rows(db_url, "SELECT count(*) FROM sqlq_processes WHERE name = :n", {"n": name}) == [(0,)]
        with pytest.raises(ProcessPrunedError, match="forced it out"):
            early.get(timeout=10)
        assert rows(db_url, "SELECT count(*) FROM sqlq_ready_executions") == [(1,)]   # the acks_late one
    finally:
        a.cont()
        a.close()
        producer.close()


def test_pid_identity_tells_a_gone_or_reused_pid_from_a_live_one():
    if pid_identity.identity() is None:
        pytest.skip("this platform cannot tell (no /proc): processes are pruned by heartbeat age only")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        recorded = pid_identity.identity(child.pid)
        assert recorded and not pid_identity.is_gone(child.pid, recorded)
        # The same PID started at another time (a reused PID) is not the registered process.
        namespace, _, started = recorded.rpartition("/")
        assert pid_identity.is_gone(child.pid, f"{namespace}/{int(started) + 1}")
        # Another boot or PID namespace (another machine, another container): cannot tell, so never.
        assert not pid_identity.is_gone(child.pid, "linux/another-boot/pid:[1]/1")
        assert not pid_identity.is_gone(child.pid, None)
    finally:
        child.kill()
    # Killed, not reaped yet: a zombie is gone too (once the kernel has ended it).
    wait_until(lambda: pid_identity.is_gone(child.pid, recorded), 5, 0.01, "the killed child to be a zombie")
    child.wait()
    assert pid_identity.is_gone(child.pid, recorded)      # no such PID


def test_an_sqlite_store_created_before_pid_identity_gains_the_column(sqlite_url):
    """SQLite creates its own tables (no migrations): a file from an older version gets the column."""
    from celery_sqlbackend.options import Options
    from celery_sqlbackend.store import Store
    Store(sqlite_url, Options()).ensure_schema()
    rows(sqlite_url, "ALTER TABLE sqlq_processes DROP COLUMN pid_identity")
    store = Store(sqlite_url, Options())
    store.ensure_schema()
    assert "pid_identity" in [r[1] for r in rows(sqlite_url, "PRAGMA table_info(sqlq_processes)")]
    store.engine.dispose()
