"""Remote control and monitoring over the SQL broker, with the real ``celery`` CLI and real workers.

``celery inspect`` / ``celery control`` broadcast through a fanout exchange and
collect replies through a direct one; ``celery events`` reads a topic exchange.
All three need bindings made in one process to route messages published in
another, which is what ``celery_sqlbackend.fanout`` keeps in the database.
"""
from __future__ import annotations

import json
import socket
import urllib.request

import pytest

from tests.harness import rows, wait_until


def _bindings(db_url, exchange):
    return rows(db_url, "SELECT queue_name, expires_at FROM sqlq_bindings WHERE exchange = :e", {"e": exchange})


def test_inspect_ping_answered_by_two_workers(db_url, make_app, spawn_worker, tmp_path):
    cli = make_app(db_url)
    spawn_worker(tmp_path, hostname="alpha@%h", pool="threads", concurrency=1)
    spawn_worker(tmp_path, hostname="beta@%h", pool="solo")
    host = socket.gethostname()

    # Two clients at once, each with its own replies.  Each names both workers (``-d``), so it returns
    # once both have replied, well before its --timeout: given 45 s, a client that waited out its 60
    # would be killed (kombu's client counts drain_events calls, and must get one reply per call).
    both = f"alpha@{host},beta@{host}"
    replies, stats_out = cli.run_together(("inspect", "ping", "--json", "-d", both, "--timeout", "60"),
                                          ("inspect", "stats", "--json", "-d", both, "--timeout", "60"),
                                          timeout=45)
    answered = json.loads(replies.stdout)
    assert answered == {f"alpha@{host}": {"ok": "pong"}, f"beta@{host}": {"ok": "pong"}}, replies.stdout

    # The reply queues of the finished clients are gone from the database (deleted,
    # or expiring); the workers' own pidbox queues are bound, with an expiry.
    pidbox = {q for q, _ in _bindings(db_url, "celery.pidbox")}
    assert pidbox == {f"alpha@{host}.celery.pidbox", f"beta@{host}.celery.pidbox"}
    assert all(exp is not None for _, exp in _bindings(db_url, "celery.pidbox"))

    stats = json.loads(stats_out.stdout)
    assert set(stats) == {f"alpha@{host}", f"beta@{host}"}
    assert stats[f"alpha@{host}"]["broker"]["transport"] == "sqlq"


def test_control_revoke_stops_a_queued_task(db_url, make_app, spawn_worker, tmp_path):
    cli = make_app(db_url)
    worker = spawn_worker(tmp_path, hostname="rev@%h", pool="threads", concurrency=1)
    marker, other = tmp_path / "revoked-ran", tmp_path / "other-ran"

    # Hold the queue (a pause lives in the database) so the task is still queued
    # when the revoke arrives; then let it go.
    cli.run("sqlq", "queue", "pause", "celery")
    task_id = cli.run("call", "testapp.touch", "--args", json.dumps([str(marker)])).stdout.strip()
    # The client waits for the named worker's reply; the test goes on once the worker has the revoke.
    revoke = cli.start("control", "revoke", task_id, "-d", f"rev@{socket.gethostname()}", "--timeout", "30")
    worker.wait_log(rf"Tasks flagged as revoked: {task_id}", timeout=30)
    cli.run("sqlq", "queue", "resume", "celery")

    worker.wait_log(rf"Discarding revoked task: testapp\.touch\[{task_id}\]", timeout=20)
    # The worker goes on with the next job; the revoked one never ran and is finished in the store.
    cli.run("call", "testapp.touch", "--args", json.dumps([str(other)]))
    wait_until(other.exists, 20, message="the next task to run")
    assert not marker.exists()
    assert rows(db_url, "SELECT count(*) FROM sqlq_ready_executions")[0][0] == 0
    out = cli.finish(revoke)
    assert "revoked" in out.stdout, out.stdout   # the worker's reply reached the client


def test_events_dump_sees_task_events_and_its_queue_expires(db_url, make_app, spawn_worker, tmp_path, procs):
    # (The worker's own maintenance, at its heartbeat, would expire the queue too, and then the
    # `sqlq prune` below finds nothing to report: the heartbeat is kept out of this test's way.)
    cli = make_app(db_url, transport_options={"heartbeat_interval": 3600, "alive_threshold": 7200},
                   event_queue_expires=2.0)
    spawn_worker(tmp_path, hostname="ev@%h", pool="threads", concurrency=1, extra_args=["-E"])
    log = tmp_path / "events.log"
    dump = cli.popen("events", "--dump", log=log)
    procs.append(dump)
    wait_until(lambda: _bindings(db_url, "celeryev"), 30, message="celery events to bind its queue")

    task_id = cli.run("call", "testapp.add", "--args", "[2, 3]").stdout.strip()
    text = wait_until(lambda: "task succeeded" in log.read_text() and log.read_text(), 30,
                      message="task-succeeded in celery events --dump")
    assert "task received" in text and task_id in text, text
    assert " heartbeat: " in text, text  # worker events too

    # A reader that dies without cleaning up: its queue expires (event_queue_expires)
    # and maintenance removes the binding and whatever piled up in it.
    import os, signal
    os.killpg(dump.pid, signal.SIGKILL)
    dump.wait(10)
    (queue,) = [q for q, _ in _bindings(db_url, "celeryev")]
    cli.run("call", "testapp.add", "--args", "[1, 1]")   # more events into the orphaned queue
    wait_until(lambda: rows(db_url, "SELECT count(*) FROM sqlq_ready_executions WHERE queue_name = :q",
                            {"q": queue})[0][0] > 0, 20, message="events piling up for the dead reader")

    def pruned():
        report = cli.json("sqlq", "prune")
        return queue in report["expired_queues"] and report
    report = wait_until(pruned, 60, interval=0.5, message="the orphaned event queue to expire")
    assert report["dropped_messages"] > 0
    assert _bindings(db_url, "celeryev") == []
    assert rows(db_url, "SELECT count(*) FROM sqlq_ready_executions WHERE queue_name = :q", {"q": queue}) == [(0,)]


def test_flower_lists_the_worker_and_its_tasks(sqlite_url, make_app, spawn_worker, tmp_path, procs):
    pytest.importorskip("flower")
    cli = make_app(sqlite_url)
    spawn_worker(tmp_path, hostname="fl@%h", pool="threads", concurrency=1, extra_args=["-E"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli.env["FLOWER_UNAUTHENTICATED_API"] = "true"
    flower = cli.popen("flower", "--address=127.0.0.1", f"--port={port}", "--inspect_timeout=5000",
                       log=tmp_path / "flower.log")
    procs.append(flower)

    def get(path):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return json.loads(resp.read())

    host = socket.gethostname()
    workers = wait_until(lambda: get("/api/workers?refresh=1").get(f"fl@{host}"), 60, interval=0.5,
                         ignore=(OSError, ValueError), message="flower /api/workers to list the worker")
    assert "stats" in workers or "registered" in workers, workers

    task_id = cli.run("call", "testapp.add", "--args", "[20, 22]").stdout.strip()
    task = wait_until(lambda: get("/api/tasks").get(task_id), 60, interval=0.5, ignore=(OSError, ValueError),
                      message="flower /api/tasks to list the task")
    wait_until(lambda: get("/api/tasks").get(task_id, {}).get("state") == "SUCCESS", 30, interval=0.5,
               ignore=(OSError, ValueError), message="the task to show as SUCCESS in flower")
    assert task["name"] == "testapp.add"
