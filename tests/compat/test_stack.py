"""The declared stack end to end: a real prefork worker, broker and results in SQL, on every engine.

This module is what ``.ci/run`` also runs on the oldest declared stack (Celery
5.5, kombu 5.5, SQLAlchemy 2.0), beside the whole suite on the newest: 200
tasks each run exactly once, a group, a chord (and a failing one), results
compressed with ``result_compression`` in the layout every supported Celery reads.
"""
from __future__ import annotations

from collections import Counter

import pytest
from celery import chord, group
from celery.exceptions import ChordError

from tests.harness import rows, wait_until

from .conftest import HERE, runs


@pytest.fixture
def worker(stack, tmp_path, spawn_worker):
    module, runs_file, env = stack
    return spawn_worker(tmp_path, app="stackapp", app_dir=HERE, concurrency=2, env=env,
                        extra_args=["--without-heartbeat"], ready_timeout=60)


def test_200_tasks_run_exactly_once(stack, worker, db_url):
    module, runs_file, _ = stack
    results = [module.record.delay(f"t{i}") for i in range(200)]
    assert [r.get(timeout=60) for r in results] == [f"t{i}" for i in range(200)]
    counts = Counter(runs(runs_file))
    assert sorted(counts) == sorted(f"t{i}" for i in range(200))
    assert set(counts.values()) == {1}, {k: v for k, v in counts.items() if v != 1}
    wait_until(lambda: rows(db_url, "select count(*) from sqlq_jobs where finished_at is null") == [(0,)],
               timeout=20, message="every job recorded finished")
    assert rows(db_url, "select count(*) from sqlq_claimed_executions") == [(0,)]
    assert rows(db_url, "select count(*) from sqlq_failed_executions") == [(0,)]


def test_group_and_chord(stack, worker, db_url):
    module, runs_file, _ = stack
    assert group(module.add.s(i, i) for i in range(20)).delay().get(timeout=60) == [2 * i for i in range(20)]
    result = chord(module.add.s(i, 1) for i in range(10))(module.tsum.s())
    assert result.get(timeout=60) == sum(range(1, 11))
    # The body ran once (a native chord: a counter in SQL, no chord_unlock).
    wait_until(lambda: runs(runs_file).count("chord-body") == 1, timeout=10, message="the chord body")
    assert runs(runs_file).count("chord-body") == 1
    # Stored compressed (result_compression = zlib: kombu says x-gzip), in the layout Celery 5.7 writes too.
    [(payload,)] = rows(db_url, "select payload from sqlq_results where task_id = :t", {"t": result.id})
    assert bytes(payload).startswith(b"\x00celery-compressed\x00application/x-gzip\x00")


def test_failing_chord_header_fails_the_body_with_its_cause(stack, worker):
    module, runs_file, _ = stack
    result = chord([module.add.s(1, 1), module.fail.s("header broke")])(module.tsum.s())
    with pytest.raises(ValueError, match="header broke"):   # the failed header first, as Celery documents
        result.get(timeout=60)
    error = result.get(timeout=60, propagate=False)
    assert isinstance(error, ChordError) and "header broke" in str(error), error
    assert "chord-body" not in runs(runs_file)
