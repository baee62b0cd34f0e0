"""What Celery's own integration suite found missing, with real workers on every engine.

* ``celery worker -c auto``: the process row gets the integer Celery resolved, not the string.
* A revoke published before its task is seen before the task starts, also when the worker
  is woken by NOTIFY for the task while the remote-control queue waits for its own poll.
"""
from __future__ import annotations

import re
import uuid

from celery import Celery

import celery_sqlbackend  # noqa: F401  (registers the sqlq transport)

from tests.harness import rows, wait_until, write_app

TASKS = '''
import os

@app.task(name="t.touch")
def touch(path):
    with open(path, "w") as f:
        f.write("ran")
'''


def test_concurrency_auto_registers_the_resolved_integer(tmp_path, db_url, spawn_worker):
    write_app(tmp_path, f"sqlq+{db_url}", extra_conf={
        "broker_transport_options": {"create_tables": True},
        "broker_connection_retry_on_startup": True}, tasks_source=TASKS)
    worker = spawn_worker(tmp_path, hostname="auto@%h", extra_args=["-c", "auto"])
    resolved = int(worker.wait_log(r"worker_concurrency='auto' resolved to (\d+)").group(1))

    def registered():
        found = rows(db_url, "SELECT concurrency FROM sqlq_processes WHERE name LIKE 'auto@%'")
        return found and found[0][0] == resolved and found
    [(concurrency,)] = wait_until(registered, 20, 0.1, "the resolved concurrency in the process row")
    assert isinstance(concurrency, int)
    assert "Unrecoverable error" not in worker.log_text()


def test_a_revoke_published_before_its_task_is_seen_before_the_task_starts(tmp_path, db_url, spawn_worker):
    """Twenty times: revoke an id, then publish a task with that id, with the worker idle
    (so the task's publish is what wakes it); the task never runs and is discarded."""
    url = f"sqlq+{db_url}"
    options = {"create_tables": True}   # the default polling interval: the gap this test is about
    write_app(tmp_path, url, extra_conf={"broker_transport_options": options,
                                         "broker_connection_retry_on_startup": True}, tasks_source=TASKS)
    worker = spawn_worker(tmp_path, hostname="rev@%h", pool="prefork", concurrency=2)
    producer = Celery("producer", broker=url, broker_transport_options=options)
    try:
        # The control exchange's bindings are in place once the worker answers a ping.
        wait_until(lambda: producer.control.ping(timeout=1.0), 30, 0.1, "the worker to answer a ping")
        for i in range(20):
            marker = tmp_path / f"ran-{i}"
            task_id = str(uuid.uuid4())
            producer.control.revoke(task_id)
            producer.send_task("t.touch", args=[str(marker)], task_id=task_id)
            worker.wait_log(rf"Discarding revoked task: t\.touch\[{re.escape(task_id)}\]", 20)
            assert not marker.exists(), f"round {i}: the revoked task ran"
        # The worker goes on: a task nobody revoked runs.
        last = tmp_path / "last"
        producer.send_task("t.touch", args=[str(last)])
        wait_until(last.exists, 20, 0.05, "an ordinary task to run")
        assert not any((tmp_path / f"ran-{i}").exists() for i in range(20))
    finally:
        producer.close()
