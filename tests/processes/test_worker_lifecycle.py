"""Real ``celery worker`` processes (prefork) meeting TERM, KILL and SIGSTOP.

Short intervals (heartbeat 1 s, alive threshold 4 s); a second live worker is
the pruner.  Every wait polls durable state with a deadline; timing checks use
the timestamps the database recorded, not how quickly this process noticed.
"""
from __future__ import annotations

import re
from datetime import datetime

import pytest

from tests.harness import wait_until
from tests.support.cluster import (HEARTBEAT, THRESHOLD, Cluster, invariant_violations, now, states_of, utc_ts,
                                   wait_for_claims)

#: Scheduling slack for a loaded 2-core machine, on top of what the design promises.
SLACK = 3.0


@pytest.fixture
def cluster(tmp_path, db_url):
    c = Cluster(tmp_path, db_url)
    yield c
    c.close()


def test_term_mid_job_finishes_the_job_and_deregisters_only_afterwards(cluster):
    """A warm shutdown outlasting the alive threshold: heartbeats go on until the jobs are
    recorded finished; the pruner never touches them; the process row goes last."""
    a = cluster.worker("a", concurrency=2)
    pruner = cluster.worker("pruner", queues="elsewhere")
    long = THRESHOLD + 3
    cluster.send("early", long)
    cluster.send("late", long, late=True)
    wait_until(lambda: cluster.started("early") and cluster.started("late"), 30, message="both jobs started")
    early, late = cluster.job_id("early"), cluster.job_id("late")
    [row] = cluster.processes_named("a")

    termed_at = a.term()
    samples = []

    def exited():
        snap = cluster.snapshot()
        samples.append((now(), states_of(snap), row.id in snap["processes"],
                        snap["processes"].get(row.id)))
        return not a.alive()
    wait_until(exited, long + 30, 0.1, "worker a to exit after TERM")

    assert a.returncode == 0
    # Both ran once, to the end, on a.
    for key in ("early", "late"):
        assert [m[1] for m in cluster.marks(key)] == ["start", "end"]
    final = states_of(cluster.snapshot())
    assert final[early] == final[late] == "finished"
    assert cluster.ended("early")[0][4] < utc_ts(cluster.snapshot()["jobs"][early].finished_at)
    # Never failed, never released, in any sample; the row outlived the jobs.
    for _, states, registered, _ in samples:
        assert states[early] in ("claimed", "finished") and states[late] in ("claimed", "finished")
        if not registered:
            assert states[early] == states[late] == "finished"
    assert not samples[-1][2], "the process row is deleted at exit"
    first_gone = min(at for at, _, registered, _ in samples if not registered)
    snap = cluster.snapshot()
    for job in (early, late):
        assert utc_ts(snap["jobs"][job].finished_at) <= first_gone
    # The drain outlasted the alive threshold, and heartbeats went on until the jobs ended.
    ended_at = max(cluster.ended(k)[0][4] for k in ("early", "late"))
    assert ended_at - termed_at > THRESHOLD
    last_beat = max(utc_ts(p.last_heartbeat_at) for _, _, reg, p in samples if reg)
    assert last_beat >= ended_at - 2 * HEARTBEAT
    assert "pruned dead process" not in pruner.log_text()
    assert not cluster.snapshot()["failed"]


def test_kill_fails_the_started_job_and_reruns_the_acks_late_one_elsewhere(cluster):
    a = cluster.worker("a", concurrency=2)
    cluster.send("early", 30)
    cluster.send("late", 30, late=True)
    cluster.send("untouched", 0.1, queue="nobody")
    wait_until(lambda: cluster.started("early") and cluster.started("late"), 30, message="both jobs started")
    wait_for_claims(cluster, 2, "a", started=1)     # the early-ack job's start is on record
    cluster.worker("b")                         # the survivor, and the pruner
    early, late, untouched = (cluster.job_id(k) for k in ("early", "late", "untouched"))
    killed_at = a.kill_group()
    a.wait_exit(10)

    wait_until(lambda: early in cluster.snapshot()["failed"], THRESHOLD + HEARTBEAT + SLACK + 5, 0.1,
               "the early-ack job to be failed")
    snap = cluster.snapshot()
    failure = snap["failed"][early]
    assert failure.error_class == "ProcessPrunedError"
    assert "a@" in failure.error and "last heartbeat at" in failure.error
    # b runs on the same host, where the OS says a's PID is gone: pruned at b's next beat, without
    # waiting for the threshold (the threshold path is test_a_frozen_worker_...: a frozen PID still runs).
    assert "no longer runs it" in failure.error
    assert utc_ts(failure.failed_at) - killed_at <= HEARTBEAT + SLACK
    last_beat = re.search(r"last heartbeat at (\S+)Z", failure.error).group(1)
    assert (failure.failed_at - datetime.fromisoformat(last_beat)).total_seconds() < THRESHOLD

    # The acks_late job runs again, on b.
    wait_until(lambda: cluster.started("late", "b"), 30, message="the acks_late job to start again on b")
    snap = cluster.snapshot()
    assert cluster.processes_named("a", snap) == []
    [b_row] = cluster.processes_named("b", snap)
    assert snap["claimed"][late].process_id == b_row.id
    # a's delivery was counted when the pruner released it; b's (the second) is counted when it ends.
    assert snap["jobs"][late].releases == 1 and snap["jobs"][late].deliveries == 1
    # Nothing else changed: the job on a queue nobody consumes is still ready, one failure only.
    states = states_of(snap)
    assert states[untouched] == "ready" and states[early] == "failed"
    assert list(snap["failed"]) == [early]
    assert cluster.started("early", "b") == []
    assert invariant_violations(snap) == []


def test_a_frozen_worker_is_pruned_and_on_waking_does_not_finish_what_it_lost(cluster):
    a = cluster.worker("a", concurrency=2)
    long = 2.0
    cluster.send("early", long)
    cluster.send("late", long, late=True)
    wait_until(lambda: cluster.started("early") and cluster.started("late"), 30, message="both jobs started")
    wait_for_claims(cluster, 2, "a", started=1)     # the early-ack job's start is on record
    [old_row] = cluster.processes_named("a")
    early, late = cluster.job_id("early"), cluster.job_id("late")

    a.stop()                                    # the whole group: a frozen machine
    survivor = cluster.worker("b")
    try:
        wait_until(lambda: early in cluster.snapshot()["failed"], THRESHOLD + HEARTBEAT + SLACK + 10, 0.1,
                   "the frozen worker to be pruned")
        wait_until(lambda: cluster.ended("late", "b"), 30, message="the acks_late job to run again on b")
        wait_until(lambda: states_of(cluster.snapshot())[late] == "finished", 20, message="late finished by b")
    finally:
        a.cont()

    # On waking, a's tasks run to their end (their sleep is over) and a learns it was pruned.
    wait_until(lambda: cluster.ended("early", "a") and cluster.ended("late", "a"), 30,
               message="a's tasks to return after SIGCONT")
    a.wait_log(r"was pruned while still alive", 30)
    wait_until(lambda: [p for p in cluster.processes_named("a") if p.id != old_row.id], 30,
               message="a to register afresh")
    wait_until(lambda: a.log_text().count("had been taken away") >= 2, 30,
               message="a's fenced finishes to be refused")

    snap = cluster.snapshot()
    states = states_of(snap)
    assert states[early] == "failed" and snap["failed"][early].error_class == "ProcessPrunedError"
    assert states[late] == "finished"
    assert snap["jobs"][early].finished_at is None
    assert old_row.id not in snap["processes"]
    assert invariant_violations(snap) == []
    assert a.alive() and survivor.alive()


def test_a_worker_warns_at_start_when_the_threshold_is_under_two_heartbeats(tmp_path, sqlite_url):
    cluster = Cluster(tmp_path, sqlite_url, heartbeat_interval=2, alive_threshold=3)
    try:
        w = cluster.worker("w")
        w.wait_log(r"alive_threshold \(3\.0s\) is less than twice heartbeat_interval \(2\.0s\)", 10)
    finally:
        cluster.close()
