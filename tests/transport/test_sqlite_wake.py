"""SQLite wake-ups (``sqlite_wake``): an idle worker on a SQLite file is woken at the publisher's commit,
through the wake sockets beside the file, not by its poll; a worker killed with SIGKILL leaves nothing
that breaks publishing.

The workers poll once a minute here (and wait on the sockets, as they do by default): a job that starts
within 10 s of being sent was woken.
"""
from __future__ import annotations

import importlib
import os
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from celery_sqlbackend import enqueue_in
from celery_sqlbackend.notify import waiter_for
from celery_sqlbackend.options import Options
from celery_sqlbackend.publishing import put
from celery_sqlbackend.sqlite_wake import SUFFIX
from celery_sqlbackend.sqlite_wake import waiter_for as sqlite_waiter_for
from celery_sqlbackend.store import Store
from celery_sqlbackend.store.jobs import NewJob
from tests.harness import wait_until

from tests.harness import write_app

POLL = 60.0
WOKEN_WITHIN = 10.0


def _wake_dir(url: str) -> Path:
    return Path(os.path.realpath(url.removeprefix("sqlite:///")) + SUFFIX)


def _sockets_of(url: str, pid: int) -> list[str]:
    try:
        return [n for n in os.listdir(_wake_dir(url)) if n.split("-")[0] == str(pid)]
    except FileNotFoundError:
        return []


def _started_at(runs_file: Path, label: str) -> float:
    [at] = [float(line.split()[2]) for line in runs_file.read_text().splitlines() if line.startswith(f"{label} ")]
    return at


TASKS = '''
import os, time

@app.task(name="wake.record")
def record(label):
    fd = os.open(os.environ["WAKE_RUNS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{label} {os.getpid()} {time.time():.6f}\\n".encode())
    finally:
        os.close(fd)
    return label
'''


@pytest.fixture
def slow_poll(sqlite_url, tmp_path, monkeypatch):
    """(app module, runs file, env): an app polling once a minute, woken through the sockets."""
    runs = tmp_path / "runs.txt"
    conf = {"broker_transport_options": {"create_tables": True, "polling_interval": POLL},
            "broker_connection_retry_on_startup": True}
    write_app(tmp_path, f"sqlq+{sqlite_url}", f"sqlq+{sqlite_url}", extra_conf=conf, tasks_source=TASKS,
              module="wakeapp")
    monkeypatch.setenv("WAKE_RUNS", str(runs))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("wakeapp", None)
    module = importlib.import_module("wakeapp")
    yield module, runs, {"WAKE_RUNS": str(runs)}
    sys.modules.pop("wakeapp", None)


def _idle_worker(spawn_worker, tmp_path, env, url):
    worker = spawn_worker(tmp_path, app="wakeapp", concurrency=1, env=env, extra_args=["--without-heartbeat"])
    wait_until(lambda: _sockets_of(url, worker.pid), 30, message=f"the worker's wake socket\n{worker.output()}")
    return worker


def test_an_idle_worker_is_woken_at_commit_not_by_its_poll(slow_poll, sqlite_url, tmp_path, spawn_worker):
    module, runs_file, env = slow_poll
    worker = _idle_worker(spawn_worker, tmp_path, env, sqlite_url)

    sent = time.time()
    assert module.record.delay("plain").get(timeout=POLL / 2) == "plain"
    assert _started_at(runs_file, "plain") - sent < WOKEN_WITHIN, worker.output()

    # enqueue_in: the wake follows the caller's commit, on the caller's own engine.
    engine = create_engine(sqlite_url, connect_args={"timeout": 30})
    with Session(engine) as session:
        with session.begin():
            with enqueue_in(session):
                result = module.record.delay("in-session")
            sent = time.time()
        assert result.get(timeout=POLL / 2) == "in-session"
    assert _started_at(runs_file, "in-session") - sent < WOKEN_WITHIN, worker.output()
    engine.dispose()


def test_a_worker_killed_with_sigkill_leaves_no_socket_that_breaks_publishing(slow_poll, sqlite_url, tmp_path,
                                                                               spawn_worker):
    module, runs_file, env = slow_poll
    killed = _idle_worker(spawn_worker, tmp_path, env, sqlite_url)
    [stale] = _sockets_of(sqlite_url, killed.pid)
    killed.kill_group()
    killed.wait_exit(30)
    assert (_wake_dir(sqlite_url) / stale).exists()   # nobody removed it: it was killed

    result = module.record.delay("after-kill")        # publishing works, and clears the dead socket
    assert not (_wake_dir(sqlite_url) / stale).exists()

    survivor = _idle_worker(spawn_worker, tmp_path, env, sqlite_url)
    assert result.get(timeout=POLL / 2) == "after-kill"     # (claimed at its start)
    sent = time.time()
    assert module.record.delay("woken").get(timeout=POLL / 2) == "woken"
    assert _started_at(runs_file, "woken") - sent < WOKEN_WITHIN, survivor.output()
    assert sorted(os.listdir(_wake_dir(sqlite_url))) == _sockets_of(sqlite_url, survivor.pid)


def _job(queue: str = "q") -> NewJob:
    return NewJob(queue=queue, payload="{}", task_name="t", task_id=None, priority=0,
                  created_at=datetime.now(timezone.utc).replace(tzinfo=None))


def test_the_waiter_wakes_only_for_commits_and_not_for_in_memory_databases(sqlite_url):
    store = Store(sqlite_url, Options(create_tables=True))    # (on by default)
    store.ensure_schema()
    waiter = waiter_for(store)
    waiter.drain()

    woke: list[bool] = []
    thread = threading.Thread(target=lambda: woke.append(waiter.wait(POLL)))
    thread.start()
    store.jobs.add(_job())
    thread.join(POLL)
    assert woke == [True]

    with store.engine.connect() as conn:            # a rolled-back enqueue wakes nobody
        with conn.begin() as transaction:
            with enqueue_in(conn):
                put(store, _job())
            transaction.rollback()
    assert waiter.wait(0) is False

    assert sqlite_waiter_for(create_engine("sqlite://")) is None      # in memory: no file, poll only
    assert waiter_for(Store(sqlite_url, Options(create_tables=True, sqlite_wake=False))) is None  # turned off
