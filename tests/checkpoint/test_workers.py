"""Real workers, real signals: the stop flag reaches the task, and iterative jobs survive restarts.

Every test starts ``celery worker`` subprocesses on the sqlq transport
(SQLite file broker) running ``ckapp``; see ``workers.py``.
"""
from __future__ import annotations

import signal
import uuid

import pytest
from celery import Celery

import celery_sqlbackend  # noqa: F401

from .workers import wait_until

POOLS = ["prefork", "threads", "solo"]
N = 10_000


def producer(directory) -> Celery:
    app = Celery("ck-producer", broker=f"sqlq+sqlite:///{directory}/jobs.sqlite3")
    app.conf.broker_transport_options = {"polling_interval": 0.05}
    return app


@pytest.fixture
def send(workers):
    app = producer(workers.directory)
    yield lambda name, *args, **options: app.send_task(name, args=args, **options)
    app.close()


@pytest.mark.parametrize("pool", POOLS)
def test_flag_reaches_the_task_within_a_second_of_term(workers, send, pool):
    worker = workers.start(pool=pool)
    send("ck.watch_flag", 30.0)
    wait_until(lambda: worker.items.mark("watch_started"), 20, message="task started")
    sent_at = worker.signal(signal.SIGTERM)
    seen_at, seen_pid = wait_until(lambda: worker.items.mark("flag_seen"), 5, 0.01, "flag seen by the task")
    assert seen_at - sent_at < 1.0, f"flag seen {seen_at - sent_at:.3f}s after TERM"
    if pool == "prefork":
        assert seen_pid != worker.pid, "under prefork the task must run in a child process"
    else:
        assert seen_pid == worker.pid
    assert worker.wait_exit() == 0
