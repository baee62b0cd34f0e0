"""Every dashboard page, timed against 1,000,000 finished and 100,000 failed jobs on PostgreSQL.

The issue asks for every page and /metrics under 300 ms at this size.  The
test records each page's median of three (tests/web/screenshots/timings-large.txt,
and the test output) and fails only beyond a generous margin (``LIMIT``), since
a shared CI machine runs other tests beside it: bench-style numbers belong in
the record, the assertion only catches a page that scans the history.
"""
from __future__ import annotations

import statistics
import time

import pytest

from tests.web.bigdata import populate_large

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

LIMIT = 1.0   # seconds; the target is 0.3
PAGES = [
    "/queues", "/jobs", "/jobs?state=finished", "/jobs?state=failed", "/jobs?state=ready&queue=q1",
    "/jobs?text=customer-4242'", "/jobs?task=t3&queue=q1", "/jobs?from=2026-01-01T00:00&to=2026-01-02T00:00",
    "/jobs/500000", "/jobs/1000", "/failed", "/failed?error_class=ValueError",
    "/failed?task_name=proj.tasks.t3", "/failed?queue=q2&error_class=TimeoutError", "/processes", "/scheduled",
    "/iterative", "/metrics",
]


def test_every_page_is_fast_on_a_large_store(pg_db_url, client, shots):
    store = populate_large(pg_db_url)
    c = client(store)
    timings = {}
    for path in PAGES:
        assert c.get(path).status_code == 200, path      # warm: connections, templates, plans
        runs = []
        for _ in range(3):
            began = time.perf_counter()
            r = c.get(path)
            runs.append(time.perf_counter() - began)
            assert r.status_code == 200, path
        timings[path] = statistics.median(runs)
    report = "\n".join(f"{timings[p] * 1000:8.1f} ms  {p}" for p in PAGES)
    (shots / "timings-large.txt").write_text(
        f"1,000,000 finished + 100,000 failed jobs, PostgreSQL; median of 3 (TestClient, in process)\n{report}\n")
    print(f"\n{report}")
    slow = {p: round(t * 1000) for p, t in timings.items() if t > LIMIT}
    assert not slow, f"pages slower than {LIMIT * 1000:.0f} ms (target 300 ms): {slow}\n{report}"
    store.engine.dispose()
