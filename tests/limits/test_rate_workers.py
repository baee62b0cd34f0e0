"""Rate limits with real workers: starts of a key counted across every worker, in order.

The CI run is short (``SECONDS``); ``SQLQ_TEST_RATE_SECONDS=20`` runs the issue's full 20 s, and
then also checks the throughput (within 10% of the limit), which a short run on a busy machine
cannot promise.
"""
from __future__ import annotations

import os

from tests.harness import rows, wait_until
from tests.limits.conftest import most_in_window, records

SECONDS = float(os.environ.get("SQLQ_TEST_RATE_SECONDS", "3"))
RATE = 10


def test_three_workers_start_at_most_ten_a_second(limits_app, db_url, spawn_worker):
    directory, app, runs = limits_app
    jobs = int(SECONDS * RATE) + RATE          # the first second's burst, then the rate
    for n in range(jobs):
        app.partner.delay("x", n)
    for n in range(5):
        app.partner.delay("y", n)              # another key is not held up by "x"
    app.plain.delay(0)                         # nor is a job without limits
    assert rows(db_url, "select count(*) from sqlq_blocked_executions where kind = 'rate'") == [(jobs + 5,)]
    for _ in range(3):
        spawn_worker(directory, concurrency=2)
    wait_until(lambda: len(records(runs, "partner")) >= jobs + 5, SECONDS * 3 + 60, message="all jobs ran")
    started = records(runs, "partner")
    x = [r for r in started if r[0] == "x"]
    assert sorted(int(r[1]) for r in x) == list(range(jobs))       # every job, once
    assert [r[0] for r in records(runs, "plain")] == ["0"]
    # The rate counts claims (README): no window of a second holds more than 10 of them.  The
    # tasks' own start times follow a few milliseconds later, more on a loaded machine.
    claims, starts = [float(r[3]) for r in x], [float(r[2]) for r in x]
    assert most_in_window(claims, 1.0) <= RATE
    print(f"most claims in a 1 s window: {most_in_window(claims, 1.0)}; "
          f"most task starts: {most_in_window(starts, 1.0)}")
    # In order: FIFO within the key (the burst of a window may start in any order).
    order = [int(r[1]) for r in sorted(x, key=lambda r: float(r[3]))]
    assert all(order[i] < order[j] for i in range(len(order)) for j in range(i + RATE, len(order)))
    if "SQLQ_TEST_RATE_SECONDS" in os.environ:
        span = max(claims) - min(claims)
        assert (jobs - RATE) / span >= 0.9 * RATE, f"{jobs} starts took {span:.1f}s"
    assert rows(db_url, "select count(*) from sqlq_rate_keys where next_open is not null") == [(0,)]   # none waits
