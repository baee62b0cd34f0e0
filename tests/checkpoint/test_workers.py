"""Real workers, real signals: the stop flag reaches the task, and iterative jobs survive restarts.

Every test starts ``celery worker`` subprocesses on the sqlq transport running ``ckapp``, once per engine
(``db_url``: a SQLite file, a PostgreSQL database); see ``conftest.py``.
"""
from __future__ import annotations

import signal
import time
import uuid

import pytest
from celery import Celery

import celery_sqlbackend  # noqa: F401
from celery_sqlbackend import admin

from tests.harness import wait_until

POOLS = ["prefork", "threads", "solo"]
#: Items of the counting job: enough that a TERM sent on reaching a threshold lands well before the end
#: (at ~0.5 ms an item, the last threshold leaves about a second), few enough to spend the time on restarts.
N = 4_000


def engine_pools(pools, server_pools=("prefork",)) -> list:
    """(engine, pool) cases: every pool on SQLite, ``server_pools`` on the servers (the pools' own part is
    the same on every engine; the servers' is the store, and CI's time is short)."""
    cases = [("sqlite", pool) for pool in pools]
    cases += [(engine, pool) for engine in ("postgres", "mysql") for pool in server_pools]
    return [pytest.param(engine, pool, id=f"{engine}-{pool}") for engine, pool in cases]


def producer(broker_url: str) -> Celery:
    app = Celery("ck-producer", broker=broker_url)
    app.conf.broker_transport_options = {"polling_interval": 0.05}
    return app


@pytest.fixture
def workers(workers, db_url):
    """The checkpoint workers (conftest), on this test's engine: broker, durable cursors and results in ``db_url``."""
    if not db_url.startswith("sqlite"):
        admin.migrate(db_url)   # servers get their tables from migrations, never at run time
    workers.broker_url = f"sqlq+{db_url}"
    workers.env = {"CK_BROKER": workers.broker_url}
    return workers


@pytest.fixture
def send(workers):
    app = producer(workers.broker_url)
    yield lambda name, *args, **options: app.send_task(name, args=args, **options)
    app.close()


@pytest.mark.parametrize("db_url, pool", engine_pools(POOLS), indirect=["db_url"])
def test_flag_reaches_the_task_within_a_second_of_term(workers, send, pool):
    worker = workers.start(pool=pool)
    send("ck.watch_flag", 30.0)
    wait_until(lambda: worker.items.mark("watch_started"), 20, message="task started")
    sent_at = worker.send(signal.SIGTERM)
    seen_at, seen_pid = wait_until(lambda: worker.items.mark("flag_seen"), 5, 0.01, "flag seen by the task")
    print(f"{pool}: flag seen by pid {seen_pid} {1000 * (seen_at - sent_at):.1f} ms after TERM")
    assert seen_at - sent_at < 1.0, f"flag seen {seen_at - sent_at:.3f}s after TERM"
    if pool == "prefork":
        assert seen_pid != worker.pid, "under prefork the task must run in a child process"
    else:
        assert seen_pid == worker.pid
    assert worker.wait_exit() == 0


def _flag_latency(worker, trigger):
    worker_send = producer(worker.env["CK_BROKER"])
    try:
        worker_send.send_task("ck.watch_flag", args=(30.0,))
        wait_until(lambda: worker.items.mark("watch_started"), 20, message="task started")
        sent_at = trigger(worker_send)
        seen_at, seen_pid = wait_until(lambda: worker.items.mark("flag_seen"), 5, 0.01, "flag seen by the task")
    finally:
        worker_send.close()
    print(f"flag seen by pid {seen_pid} {1000 * (seen_at - sent_at):.1f} ms after the trigger")
    return seen_at - sent_at, seen_pid


def test_flag_reaches_spawned_prefork_children(workers):
    worker = workers.start(env={"CK_POOL_START_METHOD": "spawn"})
    latency, pid = _flag_latency(worker, lambda app: worker.send(signal.SIGTERM))
    assert latency < 1.0 and pid != worker.pid
    assert worker.wait_exit() == 0


def test_flag_is_set_before_the_soft_shutdown_wait(workers):
    # SIGQUIT with soft shutdown: Celery sends worker_shutting_down only after
    # the soft wait, when the task has been killed; the wrapper sets the flag first.
    # Celery sleeps the whole soft wait whenever a task is running, so it is the bulk of this test's time.
    worker = workers.start(env={"CK_SOFT_SHUTDOWN": "5"})
    latency, pid = _flag_latency(worker, lambda app: worker.send(signal.SIGQUIT))
    # Seen well inside the 5 s soft wait (after it, the task would have been killed unflagged).
    assert latency < 2.5 and pid != worker.pid
    worker.wait_exit()


def test_flag_is_set_by_remote_control_shutdown(workers):
    worker = workers.start()

    def shutdown(app):
        at = time.time()
        app.control.shutdown()
        return at

    latency, pid = _flag_latency(worker, shutdown)
    assert latency < 2.0 and pid != worker.pid
    worker.wait_exit()


def _completed(items):
    return [r for r in items.runs() if r["event"] == "complete"]


def _assert_each_item_once(items):
    assert items.count() == N
    assert items.duplicates() == []


@pytest.mark.parametrize("db_url, pool", engine_pools(POOLS), indirect=["db_url"])
def test_term_several_times_mid_run_processes_every_item_exactly_once(workers, send, pool):
    task_id = str(uuid.uuid4())
    send("ck.count_to", N, task_id=task_id)
    worker = workers.start(pool=pool)
    items = worker.items
    thresholds = [500, 1300, 2100]
    for threshold in thresholds:
        wait_until(lambda: items.count() >= threshold, 30, message=f"{threshold} items")
        worker.send(signal.SIGTERM)
        assert worker.wait_exit() == 0, worker.output()
        assert items.count() < N, "the job finished before the TERM; slow it down (CK_ITEM_DELAY)"
        worker = workers.start(pool=pool)
    wait_until(lambda: _completed(items), 60, message="job completed")

    _assert_each_item_once(items)
    runs = items.runs()
    assert {r["task_id"] for r in runs} == {task_id}
    assert [r["event"] for r in runs] == ["start"] + ["shutdown", "resume"] * len(thresholds) + ["shutdown", "complete"]
    complete = runs[-1]
    assert complete["times_interrupted"] == len(thresholds)
    assert complete["iterations"] == N
    assert all(r["retries"] == 0 for r in runs), "an interruption must not count as a retry"
    resumed_at = [int(r["cursor"]) for r in runs if r["event"] == "resume"]
    assert resumed_at == sorted(resumed_at) and resumed_at[0] >= thresholds[0] - 1


@pytest.mark.parametrize("db_url, pool", engine_pools(POOLS), indirect=["db_url"])
def test_max_job_runtime_reenqueues_and_processes_every_item_exactly_once(workers, send, pool):
    task_id = str(uuid.uuid4())
    send("ck.count_to", N, task_id=task_id)
    worker = workers.start(pool=pool, env={"CK_MAX_RUNTIME": "0.3"})
    items = worker.items
    wait_until(lambda: _completed(items), 60, message="job completed")

    _assert_each_item_once(items)
    runs = items.runs()
    complete = runs[-1]
    resumes = [r for r in runs if r["event"] == "resume"]
    assert complete["times_interrupted"] == len(resumes) >= 2
    assert all(r["retries"] == 0 for r in runs)
    assert {r["pid"] for r in runs} <= {worker.pid} | {r["pid"] for r in runs if r["pid"] != worker.pid}
    assert worker.proc.poll() is None, "max_job_runtime must not stop the worker"


@pytest.mark.parametrize("db_url, pool", engine_pools(POOLS), indirect=["db_url"])
def test_after_kill_items_are_redone_only_back_to_the_last_durable_checkpoint(workers, send, pool):
    every = 250
    task_id = str(uuid.uuid4())
    send("ck.count_to", N, task_id=task_id)
    env = {"CK_CHECKPOINT_EVERY": str(every)}
    worker = workers.start(pool=pool, env=env)
    items = worker.items
    wait_until(lambda: items.count() >= 1000 + every // 2, 30, message="items before the kill")
    worker.kill_group()  # SIGKILL to the main process and its children: no chance to save anything
    done_before_kill = items.count()
    assert done_before_kill < N

    worker = workers.start(pool=pool, env=env)  # prunes the dead worker, whose claim goes back to ready
    wait_until(lambda: _completed(items), 60, message="job completed after the kill")

    runs = items.runs()
    resume = [r for r in runs if r["event"] == "resume"]
    assert len(resume) == 1
    saved = int(resume[0]["cursor"])
    assert resume[0]["iterations"] % every == 0 and saved == resume[0]["iterations"] - 1
    assert done_before_kill - every <= saved < done_before_kill
    redone = [item for item, _ in items.duplicates()]
    assert redone == list(range(saved + 1, done_before_kill))
    assert items.count() == N
    assert runs[-1]["times_interrupted"] == 0


def test_async_result_waits_across_interruptions_for_the_final_run(workers):
    results = Celery("ck-results", broker=workers.broker_url, backend=workers.broker_url)
    try:
        result = results.send_task("ck.count_to", args=(3000,))
        env = {"CK_RESULTS": "1"}
        worker = workers.start(env=env)
        wait_until(lambda: worker.items.count() >= 1000, 30, message="1000 items")
        worker.send(signal.SIGTERM)
        assert worker.wait_exit() == 0
        assert worker.items.count() < 3000
        assert not result.ready() and result.state == "PENDING", "an interrupted run stores no state"
        workers.start(env=env)
        assert result.get(timeout=60) == {"iterations": 3000, "times_interrupted": 1}
    finally:
        results.close()


@pytest.mark.parametrize("db_url, pool", engine_pools(["solo", "threads"], ["threads"]), indirect=["db_url"])
def test_jobs_received_after_term_are_handed_back_without_starting(workers, send, pool):
    """A stopping solo/threads worker drains queued jobs: they go back untouched, no on_start, no empty run."""
    n = 1500   # the first job has 1200 items (at least 1.2 s) left when TERM is sent
    ids = [str(uuid.uuid4()) for _ in range(3)]
    for task_id in ids:
        send("ck.count_to", n, task_id=task_id)
    # Celery's default prefetch: the queued jobs are already in the worker when TERM arrives.
    worker = workers.start(pool=pool, env={"CK_ITEM_DELAY": "0.001", "CK_PREFETCH": "4"})
    items = worker.items
    wait_until(lambda: items.count() >= 300, 30, message="300 items of the first job")
    worker.send(signal.SIGTERM)
    assert worker.wait_exit() == 0, worker.output()
    started = {r["task_id"] for r in items.runs() if r["event"] in ("start", "resume")}
    assert len(started) == 1, f"jobs started by the stopping worker: {items.runs()}"

    workers.start(pool=pool)
    wait_until(lambda: len(_completed(items)) == 3, 90, message="3 jobs completed")
    assert items.duplicates() == [(i, 3) for i in range(n)], "each job processes each of its items once"
    events = {task_id: [r["event"] for r in items.runs() if r["task_id"] == task_id] for task_id in ids}
    (first,) = started
    assert events.pop(first) == ["start", "shutdown", "resume", "shutdown", "complete"]
    assert list(events.values()) == [["start", "shutdown", "complete"]] * 2, events
    assert all(r["times_interrupted"] == 0 for r in items.runs() if r["task_id"] != first)
