"""Limits in the store, without workers: keys at enqueue, who waits, the order they are let in,
a limit changed in code, ETA jobs, and what ``celery sqlq status`` shows."""
from __future__ import annotations

import json
from collections import Counter
import subprocess
import sys
from datetime import timedelta

import pytest

import celery_sqlbackend as sqlq
from celery_sqlbackend import Concurrency, Rate
from celery_sqlbackend.errors import ConfigurationError
from celery_sqlbackend.limits import worker as limit_worker
from celery_sqlbackend.store import utcnow
from tests.harness import rows


def _store(app):
    with app.app.connection_for_write() as conn:
        return conn.default_channel.store


def _key(db_url) -> str:
    """The column ``key``, quoted ("key" is a reserved word on MySQL)."""
    return "`key`" if db_url.startswith("mysql") else '"key"'


def _state(db_url):
    """(holds by key, blocked job ids by kind/key in let-in order, ready job ids)."""
    held = Counter(r[1] for r in rows(db_url, f"select job_id, {_key(db_url)} from sqlq_semaphore_holds"))
    holds = sorted(held.items())
    blocked = [(r[0], r[1], r[2]) for r in sorted(
        rows(db_url, f"select kind, {_key(db_url)}, job_id, priority from sqlq_blocked_executions"),
        key=lambda r: (r[0], r[1], -r[3], r[2]))]
    ready = [r[0] for r in rows(db_url, "select job_id from sqlq_ready_executions order by job_id")]
    return holds, blocked, ready


def test_keys_come_from_positional_and_keyword_arguments(limits_app, db_url):
    _, app, _ = limits_app
    app.sync.delay(7, 0)                 # {account} names the first parameter, passed by position
    app.sync.delay(n=1, account=7)
    app.sync.apply_async((8,), {"n": 2})
    app.sync.delay(7, 3)
    assert _state(db_url) == ([("account:7", 2), ("account:8", 1)], [("concurrency", "account:7", 4)], [1, 2, 3])


def test_a_key_that_cannot_be_formatted_is_an_error_at_enqueue(limits_app, db_url):
    _, app, _ = limits_app
    app.plain.delay(0)
    with pytest.raises(sqlq.LimitKeyError, match=r"account:\{account\}.*nothing was enqueued.*Pass the arguments"):
        app.sync.delay()
    with pytest.raises(sqlq.LimitKeyError, match="api:"):
        app.partner.apply_async(kwargs={"n": 1})          # "api:{0}": no first positional argument
    assert rows(db_url, "select count(*) from sqlq_jobs") == [(1,)]


def test_declarations_are_checked():
    with pytest.raises(ConfigurationError, match="whole number"):
        Concurrency(0)
    with pytest.raises(ConfigurationError, match="seconds > 0"):
        Concurrency(1, duration=-1)
    with pytest.raises(ConfigurationError, match="'10/s'"):
        Rate("ten a second")
    assert (Rate("5/10s").limit, Rate("5/10s").period) == (5, 10.0)
    assert (Rate("100/m").limit, Rate((3, timedelta(hours=1))).period) == (100, 3600.0)
    assert Concurrency(2, duration=timedelta(minutes=1)).duration == 60.0


def test_priority_then_fifo_within_a_key_and_keys_apart(limits_app, db_url):
    _, app, _ = limits_app
    store = _store(app)
    first = app.sync.delay(1, 0)          # job 1 and 2 take both slots of account:1
    app.sync.delay(1, 1)
    app.sync.apply_async((1, 2))                      # job 3, priority 0
    app.sync.apply_async((1, 3), priority=5)          # job 4, priority 5: let in first
    app.sync.apply_async((1, 4))                      # job 5
    app.sync.delay(2, 5)                              # job 6: another key, not held up
    assert _state(db_url) == ([("account:1", 2), ("account:2", 1)],
                              [("concurrency", "account:1", 4), ("concurrency", "account:1", 3),
                               ("concurrency", "account:1", 5)], [1, 2, 6])
    (job_id,), = rows(db_url, "select id from sqlq_jobs where task_id = :t", {"t": first.id})
    assert store.limits.release(job_ids=[job_id], now=utcnow()) == [4]
    assert store.limits.release(job_ids=[job_id], now=utcnow()) == []          # (twice: a no-op)
    assert store.limits.release(job_ids=[2, 4], now=utcnow()) == [3, 5]
    assert _state(db_url) == ([("account:1", 2), ("account:2", 1)], [], [1, 2, 3, 4, 5, 6])


def test_a_limit_changed_in_code_applies_to_new_jobs_and_keeps_waiting_ones(limits_app, db_url):
    _, app, _ = limits_app
    store = _store(app)
    app.sync.sqlq_limits = [Concurrency(1, key="account:{account}")]
    for n in range(4):
        app.sync.delay(1, n)
    assert _state(db_url)[0] == [("account:1", 1)] and len(_state(db_url)[1]) == 3
    app.sync.sqlq_limits = [Concurrency(3, key="account:{account}")]
    app.sync.delay(1, 4)                 # the new limit: it takes a second slot at once
    assert _state(db_url)[0] == [("account:1", 2)]
    limit_worker.chores(store)           # the key has room now: the next waiting job is let in
    holds, blocked, ready = _state(db_url)
    assert holds == [("account:1", 3)] and [b[2] for b in blocked] == [3, 4] and ready == [1, 2, 5]
    app.sync.sqlq_limits = [Rate("2/h", key="account:{account}")]      # a Rate only, from now on
    app.sync.delay(1, 5)
    assert ("rate", "account:1", 6) in _state(db_url)[1]


def test_an_eta_job_is_admitted_by_its_limits_when_due(limits_app, db_url):
    _, app, _ = limits_app
    store = _store(app)
    app.sync.delay(3, 0)
    app.sync.delay(3, 1)
    app.sync.apply_async((3, 2), countdown=2)
    assert rows(db_url, "select job_id from sqlq_scheduled_executions") == [(3,)]
    assert store.executions.dispatch_due(now=utcnow() + timedelta(seconds=5), limit=10) == 0   # not by the plain path
    rows_before = _state(db_url)
    assert rows_before[1] == []
    store.limits.dispatch_due(now=utcnow() + timedelta(seconds=5), limit=10)
    assert _state(db_url)[1] == [("concurrency", "account:3", 3)]
    assert rows(db_url, "select count(*) from sqlq_scheduled_executions") == [(0,)]


def test_status_shows_blocked_jobs_per_key(limits_app, db_url, tmp_path):
    directory, app, _ = limits_app
    for n in range(4):
        app.sync.delay(9, n)
    for n in range(3):
        app.partner.delay("p[red]", n)
    env = {"PYTHONPATH": f"{directory}:{sys.path[0]}"}
    import os
    out = subprocess.run([sys.executable, "-m", "celery", "-A", "testapp", "sqlq", "status", "--json"],
                         capture_output=True, text=True, timeout=60, cwd=directory, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    blocked = json.loads(out.stdout)["blocked"]
    assert blocked["total"] == 5
    keys = {(k["kind"], k["key"]): k for k in blocked["keys"]}
    assert keys[("concurrency", "account:9")]["blocked"] == 2 and keys[("concurrency", "account:9")]["held"] == 2
    assert keys[("rate", "api:p[red]")]["blocked"] == 3 and keys[("rate", "api:p[red]")]["limit"] == 10
    out = subprocess.run([sys.executable, "-m", "celery", "-A", "testapp", "sqlq", "status"],
                         capture_output=True, text=True, timeout=60, cwd=directory, env={**os.environ, **env})
    assert "Blocked on limits (5 jobs" in out.stdout and "api:p[red]" in out.stdout    # literal, not markup
    assert "2/2 slots held" in out.stdout


def test_a_purged_queue_takes_its_blocked_jobs_and_their_slots_come_back(limits_app, db_url):
    _, app, _ = limits_app
    store = _store(app)
    for n in range(3):
        app.sync.delay(4, n)
    assert _state(db_url)[0] == [("account:4", 2)] and len(_state(db_url)[1]) == 1
    assert store.queues.purge("celery") == 3
    limit_worker.chores(store)
    assert _state(db_url) == ([], [], [])
    app.sync.delay(4, 3)                 # the key's slots are free again
    assert _state(db_url)[0] == [("account:4", 1)]
