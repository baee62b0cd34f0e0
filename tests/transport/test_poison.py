"""Poison never stops a worker: messages a real ``celery worker`` cannot turn into a task go to failed,
with the reason, and the rest of the same claimed batch runs; a worker that crashes anyway counts its
releases, so a crash loop ends in failed (issue #13, items 7-9).
"""
from __future__ import annotations

import base64
import json

from tests.harness import rows, wait_until, write_app

TASKS = '''
import os

@app.task(name="t.record")
def record(label):
    fd = os.open(os.environ["RUNS_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, (label + "\\n").encode())
    finally:
        os.close(fd)


def crashing_strategy(task, app, consumer, **kwargs):
    """A task strategy that raises: Celery's consumer lets it out ("Unrecoverable error")."""
    def handler(*args, **kw):
        raise RuntimeError("strategy exploded")
    return handler

@app.task(name="t.crash", Strategy="testapp:crashing_strategy")
def crash():
    pass
'''

CONF = {"broker_transport_options": {"create_tables": True, "polling_interval": 0.05, "max_releases": 1},
        "worker_prefetch_multiplier": 10, "task_ignore_result": True,
        "broker_connection_retry_on_startup": True}


def _app(tmp_path, db_url, monkeypatch):
    monkeypatch.setenv("RUNS_FILE", str(tmp_path / "runs.txt"))
    write_app(tmp_path, f"sqlq+{db_url}", extra_conf=CONF, tasks_source=TASKS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import sys
    sys.modules.pop("testapp", None)
    return importlib.import_module("testapp").app


def _labels(tmp_path):
    try:
        return (tmp_path / "runs.txt").read_text().split()
    except FileNotFoundError:
        return []


def _poisoned(db_url, template: dict, change) -> None:
    """Store a copy of a real task message, changed by ``change(message)``, as a new ready job."""
    from celery_sqlbackend.options import Options
    from celery_sqlbackend.store import store_for, utcnow
    message = json.loads(json.dumps(template))
    change(message)
    store_for(db_url, Options.from_mapping({"create_tables": True})).jobs.enqueue(
        queue="celery", payload=json.dumps(message), task_name="t.record", task_id="poison", priority=0,
        now=utcnow())


def _body(message: dict, raw: bytes) -> None:
    message["body"] = base64.b64encode(raw).decode()


def test_messages_a_worker_cannot_use_go_to_failed_with_the_reason_and_the_batch_runs(
        tmp_path, db_url, monkeypatch, spawn_worker):
    app = _app(tmp_path, db_url, monkeypatch)
    app.tasks["t.record"].delay("first")
    [(payload,)] = rows(db_url, "select payload from sqlq_jobs")
    template = json.loads(payload)
    _poisoned(db_url, template, lambda m: _body(m, b"this is { not json"))                        # item 7
    _poisoned(db_url, template, lambda m: _body(m, b'{"args": 1}'))                               # item 8
    _poisoned(db_url, template, lambda m: m.update(headers=["task", "t.record"]))                 # item 8
    _poisoned(db_url, template, lambda m: m["properties"].update(delivery_info="celery"))         # item 8
    _poisoned(db_url, template, lambda m: m.update({"content-type": "application/x-python-serialize"}))  # 9
    app.tasks["t.record"].delay("last")

    worker = spawn_worker(tmp_path)
    wait_until(lambda: sorted(_labels(tmp_path)) == ["first", "last"], 30, message="both valid jobs ran")
    failed = wait_until(lambda: (lambda r: r if len(r) == 5 else None)(
        rows(db_url, "select j.id, f.error_class, f.error from sqlq_failed_executions f "
                     "join sqlq_jobs j on j.id = f.job_id order by j.id")), 20, message="five failed jobs")
    assert worker.alive(), worker.output()
    assert "Unrecoverable error" not in worker.log_text()
    classes = [c for _, c, _ in failed]
    assert classes == ["UndecodableMessageError", "MalformedMessageError", "MalformedMessageError",
                       "MalformedMessageError", "RefusedContentError"], failed
    reasons = [e for _, _, e in failed]
    assert "does not decode as 'application/json'" in reasons[0]
    assert "not a Celery task body" in reasons[1]
    assert "headers are a list" in reasons[2]
    assert "delivery_info is a str" in reasons[3]
    assert "not in the worker's accept_content" in reasons[4] and "unregistered" not in reasons[4]
    # None of them was recorded finished; the two valid ones were.
    finished = rows(db_url, "select count(*) from sqlq_jobs where finished_at is not null")[0][0]
    poisoned = [j for j, _, _ in failed]
    assert rows(db_url, "select count(*) from sqlq_jobs where finished_at is not null and id in ("
                + ",".join(map(str, poisoned)) + ")")[0][0] == 0
    wait_until(lambda: rows(db_url, "select count(*) from sqlq_jobs where finished_at is not null")[0][0] == 2,
               20, message=f"the two valid jobs finished (now {finished})")


def test_a_crash_loop_ends_in_failed_and_the_next_job_runs(tmp_path, db_url, monkeypatch, spawn_worker):
    app = _app(tmp_path, db_url, monkeypatch)
    app.conf.worker_prefetch_multiplier = 1
    app.tasks["t.crash"].apply_async(priority=9)
    app.tasks["t.record"].apply_async(("after",), priority=0)

    for attempt in (1, 2):     # max_releases=1: released once (counted), then failed
        worker = spawn_worker(tmp_path, wait=False, extra_args=["--prefetch-multiplier=1"])
        wait_until(lambda: not worker.alive(), 45, message=f"worker {attempt} crashed on the job")
        assert worker.returncode != 0 and "Unrecoverable error" in worker.log_text(), worker.output()
        if attempt == 1:
            assert rows(db_url, "select releases from sqlq_jobs where task_name = 't.crash'") == [(1,)]
    [(cls, error)] = rows(db_url, "select error_class, error from sqlq_failed_executions")
    assert cls == "MaxReleasesExceeded" and "WorkerCrashedError" in error
    spawn_worker(tmp_path, extra_args=["--prefetch-multiplier=1"])
    wait_until(lambda: _labels(tmp_path) == ["after"], 30, message="the job behind the poison ran")
