"""A task that raised with no retries left keeps its job as a failed execution (class, message,
traceback); ``celery sqlq failed retry`` runs it again under the same task id; Celery retries are
not failures; ``record_task_failures=False`` turns it off.  Real prefork workers, the real CLI."""
from __future__ import annotations

import pytest
from celery import Celery

import celery_sqlbackend  # noqa: F401  (registers the sqlq transport)
from tests.harness import CeleryWorker, rows, wait_until, write_app
from tests.ops.conftest import Cli

TASKS = '''
import os

@app.task(name="t.flaky")
def flaky(path):
    """Fails the first time, succeeds once ``path`` exists."""
    if not os.path.exists(path):
        open(path, "w").close()
        raise ValueError(f"first run of {os.path.basename(path)}")
    return "second run"

@app.task(name="t.late_boom", acks_late=True)
def late_boom():
    raise KeyError("late")

@app.task(name="t.retrying", bind=True, max_retries=2, default_retry_delay=0)
def retrying(self):
    raise self.retry(exc=RuntimeError("again"))

@app.task(name="t.fine")
def fine():
    return "ok"
'''


def _setup(tmp_path, db_url, **options):
    url = f"sqlq+{db_url}"
    opts = {"create_tables": True, "polling_interval": 0.1, **options}
    write_app(tmp_path, url, result_backend="sqlq://", extra_conf={
        "broker_transport_options": opts, "broker_connection_retry_on_startup": True,
        "worker_enable_remote_control": False}, tasks_source=TASKS)
    return Celery("producer", broker=url, backend="sqlq://", broker_transport_options=opts), Cli(tmp_path)


def _failed(db_url):
    return rows(db_url, "SELECT j.task_id, f.error_class, f.error FROM sqlq_failed_executions f "
                        "JOIN sqlq_jobs j ON j.id = f.job_id ORDER BY f.job_id")


def test_a_task_that_raised_is_kept_failed_and_failed_retry_reruns_it(tmp_path, db_url):
    producer, cli = _setup(tmp_path, db_url)
    worker = CeleryWorker(tmp_path, hostname="tf@%h", concurrency=2, queues="celery")
    try:
        worker.wait_ready(60)
        flaky = producer.send_task("t.flaky", args=[str(tmp_path / "flaky-ran")])
        late = producer.send_task("t.late_boom")
        retried = producer.send_task("t.retrying")
        fine = producer.send_task("t.fine")
        with pytest.raises(ValueError, match="first run"):
            flaky.get(timeout=30)
        with pytest.raises(KeyError):
            late.get(timeout=30)
        with pytest.raises(RuntimeError, match="again"):
            retried.get(timeout=30)
        assert fine.get(timeout=30) == "ok"

        failed = wait_until(lambda: len(_failed(db_url)) == 3 and _failed(db_url), 20, 0.1, "three failed jobs")
        by_task = {task_id: (cls, error) for task_id, cls, error in failed}
        cls, error = by_task[flaky.id]
        assert cls == "ValueError" and "ValueError: first run of flaky-ran" in error
        assert "Traceback (most recent call last)" in error and "raise ValueError" in error
        assert by_task[late.id][0] == "KeyError"
        # A Celery retry is no failure: the retried task is kept once, after its last retry.
        assert by_task[retried.id][0] == "RuntimeError"
        assert rows(db_url, "SELECT count(*) FROM sqlq_jobs WHERE task_id = :t", {"t": retried.id}) == [(3,)]
        # The two retried runs are finished by their acks, which the worker writes in batches.
        wait_until(lambda: rows(db_url, "SELECT count(*) FROM sqlq_jobs WHERE task_id = :t AND finished_at IS NOT "
                                        "NULL", {"t": retried.id}) == [(2,)], 20, 0.1, "the retried runs finished")
        # The job that succeeded is finished; no worker logged a lost claim for the failed ones.
        wait_until(lambda: rows(db_url, "SELECT finished_at IS NOT NULL FROM sqlq_jobs WHERE task_id = :t",
                                {"t": fine.id}) in ([(True,)], [(1,)]), 20, 0.1, "the fine job finished")
        assert "claim (process id" not in worker.log_text()

        listed = cli.json("sqlq", "failed", "list", "--error-class", "ValueError")
        assert [j["task_id"] for j in listed["jobs"]] == [flaky.id]
        shown = cli.json("sqlq", "failed", "show", str(listed["jobs"][0]["job_id"]))
        assert shown["error_class"] == "ValueError" and "Traceback" in shown["error"]

        # Retried by an operator: the same job, the same task id, and this time it succeeds.
        assert "1 failed job(s) retried" in cli.run("sqlq", "failed", "retry",
                                                    str(listed["jobs"][0]["job_id"])).stdout
        wait_until(lambda: producer.AsyncResult(flaky.id).state == "SUCCESS", 30, 0.1, "the retried task to succeed")
        assert producer.AsyncResult(flaky.id).get(timeout=5) == "second run"
        assert flaky.id not in {t for t, _, _ in _failed(db_url)}
    finally:
        worker.close()
        producer.close()


def test_record_task_failures_off_finishes_the_job_as_other_brokers_do(tmp_path, db_url):
    producer, _ = _setup(tmp_path, db_url, record_task_failures=False)
    worker = CeleryWorker(tmp_path, hostname="tf@%h", queues="celery")
    try:
        worker.wait_ready(60)
        result = producer.send_task("t.flaky", args=[str(tmp_path / "once")])
        with pytest.raises(ValueError):
            result.get(timeout=30)
        wait_until(lambda: rows(db_url, "SELECT count(*) FROM sqlq_jobs WHERE finished_at IS NOT NULL") == [(1,)],
                   20, 0.1, "the failed task's job to be finished")
        assert _failed(db_url) == []
    finally:
        worker.close()
        producer.close()
