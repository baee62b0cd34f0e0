"""When the store fails a job, its Celery result says so: FAILURE with the store's exception,
in whatever result backend the app uses (ours, Redis), so ``get()`` raises and a chord over it fails.

Real prefork workers, killed with SIGKILL mid-task; a worker started afterwards (or ``celery sqlq prune``)
is the pruner.  Short heartbeats, so a test takes seconds; the same-host PID check prunes sooner still.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from celery import Celery, chord
from celery.exceptions import TimeoutError as CeleryTimeout

import celery_sqlbackend  # noqa: F401  (registers the sqlq transport)
from celery_sqlbackend import admin
from celery_sqlbackend.errors import ProcessPrunedError
from tests.harness import REPO, CeleryWorker, rows, wait_until, write_app

TASKS = '''
import time

@app.task(name="t.slow")
def slow(path, seconds=60):
    open(path, "w").close()
    time.sleep(seconds)
    return "slow done"

@app.task(name="t.quick")
def quick(x):
    return x

@app.task(name="t.collect")
def collect(results):
    return results
'''

OPTIONS = {"create_tables": True, "heartbeat_interval": 1.0, "alive_threshold": 4.0, "polling_interval": 0.1}


def _redis_url() -> str:
    url = os.environ.get("SQLQ_TEST_REDIS_URL")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("SQLQ_TEST_REDIS_URL is required under CI (.ci/run starts Redis)", pytrace=False)
        pytest.skip("set SQLQ_TEST_REDIS_URL to run the Redis result backend variant")
    return url


@pytest.fixture(params=["sqlq", "redis"])
def backend_url(request) -> str:
    return "sqlq://" if request.param == "sqlq" else _redis_url()


def _app(tmp_path, db_url, backend_url, **options):
    url = f"sqlq+{db_url}"
    opts = {**OPTIONS, **options}
    write_app(tmp_path, url, result_backend=backend_url, extra_conf={
        "broker_transport_options": opts, "worker_prefetch_multiplier": 1,
        "broker_connection_retry_on_startup": True, "worker_enable_remote_control": False},
        tasks_source=TASKS)
    return Celery("producer", broker=url, backend=backend_url, broker_transport_options=opts)


def _wait_started(db_url, n: int) -> None:
    """``n`` claims recorded as started (early acks reach the database in batches)."""
    wait_until(lambda: rows(db_url, "SELECT count(*) FROM sqlq_claimed_executions WHERE acked_at IS NOT NULL")
               [0][0] >= n, 30, 0.1, f"{n} started job(s) on record")


def test_a_killed_workers_job_and_a_chord_over_it_fail_in_the_result_backend(tmp_path, db_url, backend_url):
    producer = _app(tmp_path, db_url, backend_url)
    a = CeleryWorker(tmp_path, hostname="a@%h", concurrency=2, queues="main")
    b = None
    try:
        a.wait_ready(60)
        lone = producer.send_task("t.slow", args=[str(tmp_path / "lone")], queue="main")
        header = [producer.signature("t.slow", args=[str(tmp_path / "part")], queue="main"),
                  producer.signature("t.quick", args=[1], queue="main")]
        joined = chord(header)(producer.signature("t.collect", queue="main"))
        wait_until(lambda: (tmp_path / "lone").exists() and (tmp_path / "part").exists(), 30, 0.05,
                   "both slow tasks to start")
        _wait_started(db_url, 2)
        assert lone.state == "STARTED" or lone.state == "PENDING"
        a.kill_group()
        a.wait_exit(10)
        # The survivor: it prunes a, and runs what a had prefetched but not started (the chord's quick part).
        b = CeleryWorker(tmp_path, hostname="b@%h", concurrency=1, queues="main").wait_ready(60)

        started = time.monotonic()
        with pytest.raises(ProcessPrunedError) as raised:
            lone.get(timeout=30, propagate=True)
        assert "was pruned" in str(raised.value) and "a@" in str(raised.value)
        assert lone.state == "FAILURE"
        # The chord's body fails too, naming the dependency that did.
        with pytest.raises(Exception) as chord_error:
            joined.get(timeout=30, propagate=True)
        assert not isinstance(chord_error.value, CeleryTimeout), "the chord never ended"
        assert "ProcessPrunedError" in repr(chord_error.value) or isinstance(chord_error.value, ProcessPrunedError)
        # ... and the body itself is failed (not left waiting for a part that never returns).
        wait_until(lambda: joined.state == "FAILURE", 20, 0.1, f"the chord body to fail (state {joined.state})")
        assert "ProcessPrunedError" in repr(joined.result), joined.result
        assert time.monotonic() - started < 30
        # The store agrees: both slow jobs are failed with ProcessPrunedError.
        failed = rows(db_url, "SELECT error_class FROM sqlq_failed_executions")
        assert sorted(failed) == [("ProcessPrunedError",), ("ProcessPrunedError",)]
    finally:
        a.close()
        if b is not None:
            b.close()
        producer.close()


def test_a_result_already_ready_is_not_overwritten(tmp_path, db_url):
    """A job that finished in Celery's eyes but is failed by the store afterwards keeps its result."""
    from celery_sqlbackend import failure_results
    from celery_sqlbackend.store import Store, utcnow
    from celery_sqlbackend.options import Options
    producer = _app(tmp_path, db_url, "sqlq://")
    store = Store(db_url, Options(create_tables=True))
    try:
        done = producer.send_task("t.quick", args=[1], queue="main")
        producer.backend.mark_as_done(done.id, 1)
        pending = producer.send_task("t.quick", args=[2], queue="main")
        job_ids = [r[0] for r in rows(db_url, "SELECT id FROM sqlq_jobs ORDER BY id")]
        pid = store.processes.register(kind="worker", name="gone@x", hostname="x", pid=1, pool=None,
                                       concurrency=1, queues="[]", now=utcnow())
        for job_id in job_ids:
            store.run(lambda c, j=job_id: c.exec_driver_sql(
                f"INSERT INTO sqlq_claimed_executions (job_id, process_id, queue_name, claimed_at, acked_at) "
                f"VALUES ({j}, {pid}, 'main', '2026-01-01 00:00:00', '2026-01-01 00:00:00')"))
            store.run(lambda c, j=job_id: c.exec_driver_sql(f"DELETE FROM sqlq_ready_executions WHERE job_id = {j}"))
        report = admin.prune(store, app=producer, force=[pid])
        assert sorted(report.failed) == job_ids
        assert done.get(timeout=5) == 1 and done.state == "SUCCESS"
        with pytest.raises(ProcessPrunedError, match="forced it out"):
            pending.get(timeout=5)
        assert failure_results.record_failures(producer, store, job_ids) == 0   # both ready now: nothing written
    finally:
        store.engine.dispose()
        producer.close()


def test_celery_sqlq_prune_right_after_a_kill_fails_the_job_and_its_result(tmp_path, db_url):
    """Default alive threshold: ``celery sqlq prune`` on the same host sees the PID is gone."""
    producer = _app(tmp_path, db_url, "sqlq://", heartbeat_interval=60.0, alive_threshold=300.0)
    a = CeleryWorker(tmp_path, hostname="a@%h", concurrency=1, queues="main")
    try:
        a.wait_ready(60)
        lone = producer.send_task("t.slow", args=[str(tmp_path / "lone")], queue="main")
        wait_until((tmp_path / "lone").exists, 30, 0.05, "the task to start")
        _wait_started(db_url, 1)
        a.kill_group()
        a.wait_exit(10)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
        out = subprocess.run([sys.executable, "-m", "celery", "-A", "testapp", "sqlq", "prune", "--json"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        assert len(report["processes"]) == 1 and report["processes"][0].startswith("a@")
        assert len(report["failed"]) == 1
        with pytest.raises(ProcessPrunedError, match="no longer runs it"):
            lone.get(timeout=10)
    finally:
        a.close()
        producer.close()


def test_a_cold_shutdown_fails_the_running_job_and_its_result(tmp_path, db_url):
    """SIGQUIT kills the running task; the worker fails its job on the way out, and its result."""
    from celery.exceptions import TaskRevokedError

    from celery_sqlbackend.errors import WorkerShutdownError
    producer = _app(tmp_path, db_url, "sqlq://")
    a = CeleryWorker(tmp_path, hostname="a@%h", concurrency=1, queues="main")
    try:
        a.wait_ready(60)
        lone = producer.send_task("t.slow", args=[str(tmp_path / "lone")], queue="main")
        wait_until((tmp_path / "lone").exists, 30, 0.05, "the task to start")
        _wait_started(db_url, 1)
        a.quit()
        a.wait_exit(30)
        assert rows(db_url, "SELECT error_class FROM sqlq_failed_executions") == [("WorkerShutdownError",)]
        # Celery's own "revoked: terminated" may reach the result first (it is never overwritten):
        # either way the caller learns the task died, and does not wait.
        with pytest.raises((WorkerShutdownError, TaskRevokedError), match="shut down|terminated"):
            lone.get(timeout=10)
    finally:
        a.close()
        producer.close()
