"""Iterative jobs keep their place through failures, on sqlq (every engine) and on Redis.

Real ``celery worker`` processes run ``ckapp``; what each job processed is
recorded per item in items.sqlite3, so "exactly once" is checked row by row.
"""
from __future__ import annotations

import datetime as dt
import os
import signal
import uuid

import pytest

from celery.exceptions import WorkerLostError  # noqa: F401  (named in failure messages)
from checkpoint.progress import list_progress
from tests.harness import process_state, wait_until

from . import typed_rows
from .brokers import broker, redis_url  # noqa: F401  (fixtures)


def _events(items, task_id):
    return [(r["event"], r["cursor"], r["retries"]) for r in items.runs() if r["task_id"] == task_id]


def _row(setup, task_id):
    found = list_progress(setup.db_url, task_ids=[task_id])
    return found[0] if found else None


@pytest.fixture
def producer(broker):
    app = broker.producer()
    yield app
    app.close()


def test_retries_resume_at_the_item_that_failed(workers, broker, producer):
    """autoretry_for at items 300 and 700 and self.retry() at 500: every item once, on_start once."""
    result = producer.send_task("ck.flaky", args=(1000, [300, 700], [500]))
    workers.start(env=broker.env())
    assert result.get(timeout=90) == {"iterations": 1000, "times_interrupted": 0}
    items = workers.items
    assert items.count() == 1000 and items.duplicates() == []
    assert _events(items, result.id) == [
        ("start", "None", 0), ("resume", "299", 1), ("resume", "499", 2), ("resume", "699", 3),
        ("shutdown", "999", 3), ("complete", "999", 3)]
    assert _row(broker, result.id).state == "done"


def test_a_decorated_shared_task_resumes_across_interruptions(workers, broker, producer):
    """@iterative_task without app= (shared_task): re-enqueued by max_job_runtime, every item once."""
    result = producer.send_task("ck.decorated_count", args=(1500,))   # ~1 s of items: 0.3 s runs
    workers.start(env=broker.env(CK_MAX_RUNTIME="0.3", CK_ITEM_DELAY="0.0005"))
    outcome = result.get(timeout=90)
    assert outcome["iterations"] == 1500 and outcome["times_interrupted"] >= 1
    items = workers.items
    assert items.count() == 1500 and items.duplicates() == []
    events = [e[0] for e in _events(items, result.id)]
    assert events[0] == "start" and events[-1] == "complete" and events.count("start") == 1
    assert _row(broker, result.id).state == "done"


def test_a_job_split_in_partitions_completes_as_one(workers, broker, producer):
    """Three partitions of one job, each interrupted by max_job_runtime and resumed, join in a chord."""
    from checkpoint.partition import in_partitions
    result = in_partitions(producer.signature("ck.partitioned_count", args=(3000,)), 3,
                           then=producer.signature("ck.sum_partitions"))
    worker = workers.start(env=broker.env(CK_RESULTS="1", CK_MAX_RUNTIME="0.3", CK_ITEM_DELAY="0.0005"),
                           concurrency=2)
    items = workers.items
    try:
        outcome = result.get(timeout=120)
    except Exception as exc:
        raise AssertionError(f"{exc!r}; runs: {items.runs()}\n{worker.output()}") from None
    assert outcome == {"partitions": [0, 1, 2], "iterations": 3000}
    assert items.count() == 3000 and items.duplicates() == [], "each item once, in exactly one partition"
    runs = items.runs()
    jobs = {r["task_id"] for r in runs}
    assert len(jobs) == 3
    for job in jobs:
        events = [r["event"] for r in runs if r["task_id"] == job]
        assert events[0] == "start" and events.count("start") == 1 and events[-1] == "complete", events
    assert any(r["event"] == "resume" for r in runs), "no partition was interrupted: slow the items down"
    assert {_row(broker, job).state for job in jobs} == {"done"}


def test_a_killed_pool_child_resumes_from_the_last_durable_checkpoint(workers, broker, producer):
    every = 250
    n = 2000
    result = producer.send_task("ck.count_to", args=(n,))
    env = broker.env(CK_CHECKPOINT_EVERY=str(every), CK_ITEM_DELAY="0.001")
    worker = workers.start(env=env)
    items = workers.items
    wait_until(lambda: items.count() >= 700, 60, message="700 items")   # between two checkpoints (500 and 750)
    child = [r for r in items.runs() if r["event"] == "start"][0]["pid"]
    assert child != worker.pid
    os.kill(child, signal.SIGKILL)  # the OOM killer's choice: the child alone
    wait_until(lambda: _gone(child), 10, message="the killed child gone")
    done_before_kill = items.count()

    try:
        outcome = result.get(timeout=90)
    except Exception as exc:
        raise AssertionError(f"{exc!r}; runs: {items.runs()}\n{worker.output()}") from None
    assert outcome == {"iterations": n, "times_interrupted": 0}, "not failed: WorkerLostError"
    assert worker.alive()
    resume = [e for e in _events(items, result.id) if e[0] == "resume"]
    assert len(resume) == 1
    saved = int(resume[0][1])
    assert (saved + 1) % every == 0 and done_before_kill - every <= saved < done_before_kill
    assert [i for i, _ in items.duplicates()] == list(range(saved + 1, done_before_kill))
    assert items.count() == n


def _gone(pid):
    return process_state(pid) in (None, "Z")   # (a zombie runs no more)


def test_a_revoked_running_job_stops_at_the_next_item_and_stays_stopped(workers, broker, producer):
    result = producer.send_task("ck.count_to", args=(50_000,))
    env = broker.env(CK_ITEM_DELAY="0.001")
    worker = workers.start(env=env)
    items = workers.items
    wait_until(lambda: items.count() >= 300, 60, message="300 items")
    producer.control.revoke(result.id)  # terminate=False: the job itself must notice
    wait_until(lambda: result.state == "REVOKED", 20, message="REVOKED state")
    stopped_at = items.count()
    assert stopped_at < 50_000
    assert _row(broker, result.id).state == "revoked"

    worker.term()
    assert worker.wait_exit() == 0
    workers.start(env=env)
    marker = producer.send_task("ck.count_to", args=(10,), task_id=f"marker-{uuid.uuid4()}")
    assert marker.get(timeout=60)["iterations"] == 10
    # The marker's items 0..9 were the revoked job's first items too.
    assert items.count() == stopped_at, "the revoked job ran again after the restart"
    assert items.duplicates() == [(i, 2) for i in range(10)]
    assert [e[0] for e in _events(items, result.id)] == ["start", "shutdown"]
    assert result.state == "REVOKED"


def test_an_invalid_cursor_fails_the_job_with_a_clear_error(workers, broker, producer):
    result = producer.send_task("ck.count_to", args=(100,), kwargs={"cursor": -5})
    workers.start(env=broker.env())
    with pytest.raises(Exception, match=r"cursor -5 is not in range\(0, 100, 1\)") as info:
        result.get(timeout=60)
    assert type(info.value).__name__ == "InvalidCursorError"
    assert workers.items.count() == 0
    assert _row(broker, result.id).state == "failed"


def test_typed_and_non_unique_keysets_walk_every_row_once(workers, broker, producer):
    """datetime, date (50 rows per value), Decimal and UUID keys, resumed many times through messages."""
    n = 600
    typed_rows.seed(broker.db_url, n)
    keys = ["created", "day", "amount", "uid"]
    results = [producer.send_task("ck.walk_rows", args=(broker.db_url, key, 10_000 * i))
               for i, key in enumerate(keys)]
    # A hand-made cursor: an ISO timestamp string, bound as a timestamp.
    after = "2024-02-28T23:00:40"
    handmade = producer.send_task("ck.walk_rows", args=(broker.db_url, "created", 100_000), kwargs={"cursor": [after]})
    # Runs of 0.25 s: several batches of 37 rows each, and several resumes per job.
    workers.start(env=broker.env(CK_MAX_RUNTIME="0.25", CK_ITEM_DELAY="0.0005"))
    items = workers.items
    for result in results + [handmade]:
        wait_until(lambda: any(e[0] == "complete" for e in _events(items, result.id)) or result.failed(), 120,
                   message=f"job {result.id} complete")
        assert not result.failed(), result.traceback
    assert items.duplicates() == []
    for i, key in enumerate(keys):
        seen = [item for (item,) in items.query("SELECT item FROM items WHERE item >= ? AND item < ?",
                                                 10_000 * i, 10_000 * i + n)]
        assert len(seen) == n, f"{key}: {len(seen)} of {n} rows"
        assert any(e[0] == "resume" for e in _events(items, results[i].id)), "the cursor went through a message"
    expected = {r[0] for r in _query(broker.db_url, "SELECT id, created FROM ck_typed_rows")
                if dt.datetime.fromisoformat(str(r[1])) > dt.datetime.fromisoformat(after)}
    got = {item - 100_000 for (item,) in items.query("SELECT item FROM items WHERE item >= 100000")}
    assert got == expected and 0 < len(got) < n


def _query(url, sql):
    from tests.harness import rows
    return rows(url, sql)


# -- Redis-specific ------------------------------------------------------------------------------

@pytest.fixture
def redis_setup(redis_url, sqlite_url):
    from .brokers import Setup
    return Setup("redis", sqlite_url, redis_url, sqlite_url, f"sqlq+{sqlite_url}")


def test_a_run_longer_than_the_visibility_timeout_runs_once(workers, redis_setup):
    """Redis redelivers an unacked message after visibility_timeout (3 s here); the job runs ~8 s."""
    app = redis_setup.producer()
    try:
        result = app.send_task("ck.count_to", args=(4000,))
        workers.start(concurrency=2, env=redis_setup.env(CK_VISIBILITY="3", CK_DEFAULT_RUNTIME="1",
                                                         CK_ITEM_DELAY="0.002"))
        assert result.get(timeout=120)["iterations"] == 4000
    finally:
        app.close()
    items = workers.items
    events = [e[0] for e in _events(items, result.id)]
    assert events.count("complete") == 1 and events.count("start") == 1
    assert events.count("resume") >= 3, "max_job_runtime (half the visibility timeout) re-enqueued the job"
    assert items.count() == 4000 and items.duplicates() == []


def test_the_worker_says_once_what_is_missing(workers, redis_setup):
    """No durable store on Redis, and a max_job_runtime not below the visibility timeout."""
    redis_setup.store_url = None
    worker = workers.start(env=redis_setup.env(CK_VISIBILITY="3", CK_MAX_RUNTIME="10"))
    worker.wait_log(r"not below the broker's visibility timeout \(3s\)")
    log = worker.wait_log(r"no durable cursor store").string
    assert log.count("no durable cursor store") == 1
    assert "checkpoint_store_url" in log
