"""A threads-pool worker that hands back its prefetched jobs at a normal (warm) shutdown says so at
INFO: it is documented behaviour, not a problem. Only started jobs left behind are a WARNING."""
from __future__ import annotations

import re

from tests.harness import rows, wait_until

from .conftest import HERE, runs


def test_prefetched_jobs_returned_at_warm_shutdown_are_info(stack, db_url, tmp_path, spawn_worker):
    module, runs_file, env = stack
    gate = tmp_path / "gate"
    module.wait_for.delay(str(gate), "long")
    for i in range(3):
        module.record.delay(f"queued{i}")
    worker = spawn_worker(tmp_path, app="stackapp", app_dir=HERE, pool="threads", concurrency=1, env=env,
                          ready_timeout=60, extra_args=["--prefetch-multiplier", "4"])
    # Four claimed, one of them started (its early ack recorded): four claimed rows alone can still be on
    # their way to the pool, and a TERM then hands every one back, the long job's too.
    wait_until(lambda: rows(db_url, "select count(*), count(acked_at) from sqlq_claimed_executions") == [(4, 1)],
               timeout=30, message="the long job running and three prefetched")
    worker.term()
    worker.wait_log(r"Warm shutdown", timeout=30)
    gate.write_text("open")
    assert worker.wait_exit(60) == 0, worker.output()
    log = worker.log_text()
    # What the pool had not started is either run during the warm shutdown (Celery's thread pool
    # drains what it was handed) or handed back to the queue; handing back is logged at INFO.
    ran = [label for label in runs(runs_file) if label.startswith("queued")]
    [(ready,)] = rows(db_url, "select count(*) from sqlq_ready_executions")
    assert "long" in runs(runs_file) and len(ran) + ready == 3, (ran, ready)
    if ready:
        assert re.search(rf"INFO/MainProcess\] process \S+ returned {ready} prefetched job\(s\) to the queue",
                         log), worker.output()
    assert not re.search(r"WARNING/MainProcess\] process \S+ left", log), worker.output()
    assert rows(db_url, "select count(*) from sqlq_claimed_executions") == [(0,)]
    assert rows(db_url, "select count(*) from sqlq_failed_executions") == [(0,)]
