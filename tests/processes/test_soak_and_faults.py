"""Long runs: heartbeats under load on one SQLite file, and a seeded random fault run.

Both are bounded for CI and longer on demand:

    SQLQ_SOAK_SECONDS=300            heartbeat soak (default 15: 15 beats of each worker under load)
    SQLQ_FAULT_SECONDS=120           fault injection time per database (default 20: a fault every 0.75-2 s
                                     while two workers are healthy, 7-10 faults in a run)
    SQLQ_FAULT_SEED=1234             replay a fault run (the seed is printed on every run)
"""
from __future__ import annotations

import os
import random
import re
import threading
import time
from collections import defaultdict

import pytest

from tests.harness import READY_LINE, wait_until
from tests.support.cluster import HEARTBEAT, THRESHOLD, Cluster, invariant_violations, states_of, utc_ts

SOAK_SECONDS = float(os.environ.get("SQLQ_SOAK_SECONDS", 15))
FAULT_SECONDS = float(os.environ.get("SQLQ_FAULT_SECONDS", 20))

KNOWN_FAILURES = {"ProcessPrunedError", "MaxReleasesExceeded", "WorkerShutdownError"}


class Feeder(threading.Thread):
    """Keeps the queue fed with jobs from ``make(i) -> (key, seconds, late)`` while ``backlog`` is low."""

    def __init__(self, cluster: Cluster, make, backlog: int = 20) -> None:
        super().__init__(daemon=True)
        self.cluster, self.make, self.backlog = cluster, make, backlog
        self.stopped = threading.Event()
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stopped.is_set():
                if self.cluster.store.executions.ready_count(queue="main") < self.backlog:
                    key, seconds, late = self.make(self.sent)
                    self.cluster.send(key, seconds, late=late)
                    self.sent += 1
                else:
                    self.stopped.wait(0.05)
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    def stop(self) -> None:
        self.stopped.set()
        self.join(30)
        assert self.error is None, f"producer failed: {self.error!r}"


def test_two_busy_workers_on_one_sqlite_file_beat_on_time(tmp_path, sqlite_url):
    cluster = Cluster(tmp_path, sqlite_url)
    try:
        workers = [cluster.worker(f"busy{i}", concurrency=2, ready=False) for i in range(2)]
        for w in workers:   # (started together, waited for together)
            w.wait_ready(60)
        feeder = Feeder(cluster, lambda i: (f"j{i}", 0.01, i % 2 == 0), backlog=40)
        feeder.start()
        beats: dict[str, list[float]] = defaultdict(list)
        deadline = time.monotonic() + SOAK_SECONDS
        while time.monotonic() < deadline:
            for p in cluster.snapshot()["processes"].values():
                ts = utc_ts(p.last_heartbeat_at)
                if not beats[p.name] or beats[p.name][-1] != ts:
                    beats[p.name].append(ts)
            time.sleep(0.2)   # sampling period, not synchronisation
        feeder.stop()
        wait_until(lambda: all(s in ("finished",) for s in states_of(cluster.snapshot()).values()), 60, 0.2,
                   "the backlog to drain")

        snap = cluster.snapshot()
        assert len(beats) == 2
        for name, stamps in beats.items():
            gaps = [b - a for a, b in zip(stamps, stamps[1:])]
            assert len(gaps) >= SOAK_SECONDS / HEARTBEAT * 0.8, (name, len(gaps))
            assert max(gaps) <= 2 * HEARTBEAT, f"{name}: a heartbeat was late by more than one interval: " \
                                               f"max gap {max(gaps):.3f}s"
        assert feeder.sent > 100
        assert not snap["failed"]
        assert invariant_violations(snap) == []
        for w in workers:
            log = w.log_text()
            assert "database is locked" not in log
            assert not re.search(r"heartbeat of .* failed|maintenance in .* failed", log)
            assert "Traceback" not in log
            assert w.alive()
    finally:
        cluster.close()


@pytest.mark.slow
def test_seeded_random_faults_leave_every_job_accounted_for(tmp_path, db_url):
    seed = int(os.environ.get("SQLQ_FAULT_SEED", random.randrange(2 ** 32)))
    print(f"\nfault run seed: {seed} (replay with SQLQ_FAULT_SEED={seed})")
    rng = random.Random(seed)
    cluster = Cluster(tmp_path, db_url)
    events: list[str] = []
    try:
        _fault_run(cluster, rng, events)
    except BaseException:
        print(f"fault run seed {seed}; events:\n  " + "\n  ".join(events))
        raise
    finally:
        cluster.close()


def _fault_run(cluster: Cluster, rng: random.Random, events: list[str]) -> None:
    counter = iter(range(10 ** 6))
    healthy = {}           # name -> worker: running, not frozen, not shutting down
    frozen = {}            # name -> (worker, continue at)
    draining = {}          # name -> worker (TERM sent)
    hard_hit: set[str] = set()   # names that were KILLed or frozen: the only ones a pruner may prune

    starting = {}          # name -> worker started in the loop, not ready yet: no fault for it
    #                        (waiting for it there would keep a frozen worker frozen past its pause)

    def start(ready: bool = True):
        name = f"w{next(counter)}"
        w = cluster.worker(name, concurrency=2, ready=False)
        (healthy if ready else starting)[name] = w
        if ready:
            w.wait_ready(60)
        events.append(f"{time.monotonic():.1f} start {name}")

    def promote_started():
        for name, w in list(starting.items()):
            if READY_LINE.search(w.log_text()):
                healthy[name] = starting.pop(name)
                events.append(f"{time.monotonic():.1f} {name} ready")
            else:
                assert w.alive(), f"{name} exited {w.returncode} before ready:\n{w.log_text()[-3000:]}"

    def job(i):
        long = rng.random() < 0.2
        return f"j{i}", rng.uniform(1.5, 4) if long else rng.uniform(0.02, 0.5), rng.random() < 0.5

    for _ in range(3):
        start(ready=False)
    for w in starting.values():   # (started together, waited for together)
        w.wait_ready(60)
    promote_started()
    feeder = Feeder(cluster, job, backlog=12)
    feeder.start()
    violations: list[str] = []
    faults = 0
    next_fault = time.monotonic() + rng.uniform(1, 2)
    deadline = time.monotonic() + FAULT_SECONDS
    while time.monotonic() < deadline:
        now = time.monotonic()
        promote_started()
        for name, (w, at) in list(frozen.items()):
            if now >= at:
                w.cont()
                del frozen[name]
                healthy[name] = w
                events.append(f"{now:.1f} CONT {name}")
        for name, w in list(draining.items()):
            if not w.alive():
                del draining[name]
                events.append(f"{now:.1f} {name} exited {w.returncode}")
                assert w.returncode == 0, f"{name} exited {w.returncode} after TERM:\n{w.log_text()[-3000:]}"
        if now >= next_fault and len(healthy) >= 2:
            name = rng.choice(sorted(healthy))
            w = healthy.pop(name)
            action = rng.choice(["TERM", "KILL", "STOP", "STOP"])
            if action == "TERM":
                w.term()
                draining[name] = w
            elif action == "KILL":
                w.kill_group()
                hard_hit.add(name)
            else:
                pause = rng.choice([rng.uniform(0.5, THRESHOLD / 2), rng.uniform(THRESHOLD + 1, THRESHOLD + 5)])
                w.stop()
                frozen[name] = (w, now + pause)
                hard_hit.add(name)
                action += f" for {pause:.1f}s"
            events.append(f"{now:.1f} {action} {name}")
            faults += 1
            if action != "STOP" and len(healthy) + len(frozen) + len(starting) < 3:
                start(ready=False)
            next_fault = time.monotonic() + rng.uniform(0.75, 2)
        violations += invariant_violations(cluster.snapshot())
        assert not violations, violations
        time.sleep(0.3)   # pacing of the fault loop, not synchronisation

    feeder.stop()
    for name, (w, _) in list(frozen.items()):
        w.cont()
        healthy[name] = w
        events.append(f"CONT {name} (end)")
    for name, w in list(starting.items()):
        w.wait_ready(60)
    promote_started()
    while len(healthy) < 2:
        start()

    def settled():
        snap = cluster.snapshot()
        problems = invariant_violations(snap)
        assert not problems, problems
        states = states_of(snap)
        return snap if all(s in ("finished", "failed") for s in states.values()) else None
    snap = wait_until(settled, 90, 0.3, "every job to be finished or failed")
    events.append(f"settled: sent {feeder.sent}")

    states = states_of(snap)
    by_task_id = {job.task_id: job_id for job_id, job in snap["jobs"].items()}
    assert set(by_task_id) == set(cluster.keys.values()), "every job sent is in the store"
    assert len(states) == feeder.sent and feeder.sent > 20
    finished_keys = {key for key, tid in cluster.keys.items() if states[by_task_id[tid]] == "finished"}
    ended = {m[0] for m in cluster.marks() if m[1] == "end"}
    assert finished_keys <= ended, f"finished without running to the end: {sorted(finished_keys - ended)}"
    for job_id, failure in snap["failed"].items():
        assert failure.error_class in KNOWN_FAILURES and failure.error, failure
        if failure.error_class == "ProcessPrunedError":
            pruned = re.search(r"process (w\d+)@", failure.error).group(1)
            assert pruned in hard_hit, f"{pruned} was pruned but only ever TERMed: {failure.error}"
    assert sum(1 for s in states.values() if s == "finished") >= feeder.sent // 2
    for w in cluster.workers:
        assert "database is locked" not in w.log_text()
    assert faults >= 3, f"only {faults} faults in {FAULT_SECONDS}s"
    print(f"fault run: {feeder.sent} jobs, {len(snap['failed'])} failed, {faults} faults, events: {len(events)}")
