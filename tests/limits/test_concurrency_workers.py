"""Concurrency limits with real workers: at most N of a key at once across every worker, and a
slot held by a killed worker comes back (pruning, or the slot's duration)."""
from __future__ import annotations

import pytest

import celery_sqlbackend as sqlq
from tests.harness import rows, wait_until
from tests.limits.conftest import by_key, load_app, most_at_once, records

KEYS = 5
JOBS = 200


def test_three_workers_never_run_more_than_two_of_a_key(limits_app, db_url, spawn_worker):
    directory, app, runs = limits_app
    # Half one by one, half in a batch (enqueue_many writes limited jobs one at a time, in order).
    for n in range(JOBS // 2):
        app.sync.delay(n % KEYS, n, 0.02)
    sqlq.enqueue_many([app.sync.s(n % KEYS, n, 0.02) for n in range(JOBS // 2, JOBS)])
    assert rows(db_url, "select count(*) from sqlq_semaphore_holds") == [(2 * KEYS,)]
    assert rows(db_url, "select count(*) from sqlq_blocked_executions where kind = 'concurrency'") == \
        [(JOBS - 2 * KEYS,)]
    for _ in range(3):
        spawn_worker(directory, concurrency=2)
    wait_until(lambda: len(records(runs, "sync")) >= JOBS, 180, message="all jobs ran")
    done = records(runs, "sync")
    assert sorted(int(r[1]) for r in done) == list(range(JOBS))          # every job, once
    per_key = by_key(done)
    assert len(per_key) == KEYS
    for key, spans in per_key.items():
        assert most_at_once([(float(r[2]), float(r[3])) for r in spans]) <= 2, f"key {key} ran 3 at once"
    wait_until(lambda: rows(db_url, "select count(*) from sqlq_semaphore_holds") == [(0,)], 30,
               message="every slot given back")
    assert rows(db_url, "select count(*) from sqlq_blocked_executions") == [(0,)]


@pytest.mark.parametrize("freed_by", ["pruning", "duration"])
def test_a_slot_whose_holder_vanished_comes_back(freed_by, tmp_path, db_url, monkeypatch, spawn_worker):
    """Pruning: the holder is SIGKILLed and pruned.  Duration: the holder hangs on (alive, never
    pruned), and its 3 s slot is given back anyway."""
    runs = tmp_path / "runs.txt"
    monkeypatch.setenv("RUNS_FILE", str(runs))
    monkeypatch.syspath_prepend(str(tmp_path))
    # Pruning: a dead process is pruned within seconds (its started job failed, its slot given
    # back).  Duration: a 3 s slot; the pruner would take an hour.
    fast = {"heartbeat_interval": 0.5, "alive_threshold": 2} if freed_by == "pruning" else \
        {"heartbeat_interval": 30, "alive_threshold": 3600}
    env = {"RUNS_FILE": str(runs), "HANG_DURATION": "3" if freed_by == "duration" else "900"}
    monkeypatch.setenv("HANG_DURATION", env["HANG_DURATION"])
    app = load_app(tmp_path, db_url, **fast)
    # (The holder consumes a queue of its own: a busy prefork worker would prefetch the next job.)
    holder = spawn_worker(tmp_path, concurrency=1, env=env, queues="hold")
    app.hang.apply_async((0,), queue="hold")
    wait_until(lambda: len(records(runs, "hang")) == 1, 60, message="the holder started")
    app.hang.delay(1)
    assert rows(db_url, "select count(*) from sqlq_blocked_executions") == [(1,)]
    if freed_by == "pruning":
        holder.kill_group()
        holder.wait_exit()
    spawn_worker(tmp_path, concurrency=1, env=env)
    wait_until(lambda: [r[0] for r in records(runs, "hang")] == ["0", "1"], 60,
               message=f"the blocked job ran once the slot came back ({freed_by})")
    if freed_by == "pruning":
        assert rows(db_url, "select count(*) from sqlq_failed_executions") == [(1,)]
    else:
        assert holder.alive()     # the first job still runs, and still holds its claim
        wait_until(lambda: rows(db_url, "select count(*) from sqlq_claimed_executions") == [(1,)], 30,
                   message="only the hanging job claimed")
