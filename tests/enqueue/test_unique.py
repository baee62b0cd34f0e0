"""Unique jobs: one job per key, decided by the database's unique index, released as the scope says."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import celery_sqlbackend as sqlq
from celery_sqlbackend.store import utcnow
from tests.enqueue.conftest import labels
from tests.harness import rows, wait_until


def _jobs(db_url, task):
    return rows(db_url, "select task_id from sqlq_jobs where task_name = :t order by id", {"t": task})


def _keys(db_url):
    return rows(db_url, "select u.key, u.held_until from sqlq_unique_keys u order by u.key")


def test_a_second_enqueue_returns_the_first_jobs_result(app_dir, db_url):
    _, app, _ = app_dir
    first = app.unique_running.delay(42)
    again = app.unique_running.delay(42)
    other = app.unique_running.delay(43)
    assert again.id == first.id and other.id != first.id
    assert _jobs(db_url, "t.unique_running") == [(first.id,), (other.id,)]
    assert _keys(db_url) == [("t.unique_running:42", "finished"), ("t.unique_running:43", "finished")]
    # The same inside a batch and inside the caller's transaction.
    results = sqlq.enqueue_many([app.unique_running.s(42), app.add.s(1, 1), app.unique_running.s(44)])
    assert results[0].id == first.id and len(_jobs(db_url, "t.unique_running")) == 3


def test_a_key_that_cannot_be_formatted_is_an_error_at_enqueue(app_dir, db_url):
    _, app, _ = app_dir
    app.add.delay(0, 0)
    with pytest.raises(sqlq.UniqueKeyError, match="cannot be made from this call"):
        app.unique_running.delay()
    with pytest.raises(sqlq.UniqueKeyError, match="keyword"):
        app.unique_for.delay(7)          # the key names {account}, a keyword
    assert rows(db_url, "select count(*) from sqlq_jobs") == [(1,)]


def test_keys_are_released_as_their_scope_says(app_dir, db_url, spawn_worker):
    directory, app, runs = app_dir
    running = app.unique_running.delay("r", label="running-1")
    queued = app.unique_queued.delay("q", label="queued-1")
    timed = app.unique_for.delay(account=7)
    spawn_worker(directory)
    wait_until(lambda: {"running-1", "queued-1", "for-7"} <= set(labels(runs)), 60, message="the jobs ran")
    # finished: "running" and "queued" keys are free, the 600 s one is still held
    wait_until(lambda: _keys(db_url) == [("t.unique_for:acct-7", None)], 30, message="keys released")
    assert app.unique_running.delay("r", label="running-2").id != running.id
    assert app.unique_queued.delay("q", label="queued-2").id != queued.id
    assert app.unique_for.delay(account=7).id == timed.id
    wait_until(lambda: {"running-2", "queued-2"} <= set(labels(runs)), 60, message="the second jobs ran")
    assert labels(runs).count("for-7") == 1


def test_a_retry_takes_its_key_over_and_a_failure_releases_it(app_dir, db_url, spawn_worker):
    directory, app, runs = app_dir
    retried = app.unique_retries.delay("k")
    fails = app.unique_fails.delay("f")
    spawn_worker(directory)
    wait_until(lambda: {"try-0", "try-1"} <= set(labels(runs)), 60, message="both tries ran")
    assert fails.get(timeout=60, propagate=False) is not None and fails.failed()
    wait_until(lambda: _keys(db_url) == [], 30, message="keys released after the retry finished and the failure")
    assert len(_jobs(db_url, "t.unique_retries")) == 2 and retried.get(timeout=30) is None


def test_a_failed_execution_releases_its_key(app_dir, db_url):
    _, app, _ = app_dir
    app.unique_running.delay("x")
    with app.app.connection_for_write() as conn:
        store = conn.default_channel.store
    (job_id,), = rows(db_url, "select id from sqlq_jobs")
    assert store.claims.fail(job_id=job_id, process_id=None, error_class="RejectedError", error="test",
                             now=utcnow())
    assert _keys(db_url) == []


RACE = textwrap.dedent('''
    import os, sys, time
    sys.path.insert(0, sys.argv[1])
    import testapp
    testapp.unique_running.delay("warm-%d" % os.getpid())   # connected, tables there
    print("ready", flush=True)
    go = os.path.join(sys.argv[1], "go")
    while not os.path.exists(go):
        time.sleep(0.001)
    print(testapp.unique_running.delay("same").id, flush=True)
''')


def test_eight_processes_enqueue_the_same_key_at_once_and_one_job_exists(app_dir, db_url):
    directory, app, _ = app_dir
    app.add.delay(0, 0)
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(directory)], stdout=subprocess.PIPE, text=True)
             for _ in range(8)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        (directory / "go").touch()
        ids = [p.stdout.readline().strip() for p in procs]
        assert [p.wait(60) for p in procs] == [0] * 8
    finally:
        for p in procs:
            p.kill()
    jobs = rows(db_url, "select task_id from sqlq_jobs where task_name = 't.unique_running' "
                        "and payload like '%same%'")
    assert len(jobs) == 1, jobs
    assert set(ids) == {jobs[0][0]}
