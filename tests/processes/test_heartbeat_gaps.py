"""Heartbeat gaps, with real ``celery worker`` processes: a worker whose heartbeats keep failing stops
claiming until one gets through; a frozen (SIGSTOP) worker that wakes never starts a prefetched job that
was released to another worker meanwhile; a maintenance chore waiting on a lock (a frozen peer's open
transaction) never holds up a live worker's heartbeats.

The heartbeats fail for real: a trigger in the database refuses every write to the process row's
heartbeat column (its other columns stay writable), and dropping it lets them through again.
Short intervals (heartbeat 1 s, alive threshold 4 s), as in ``test_worker_lifecycle``.
"""
from __future__ import annotations

import re

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from tests.harness import wait_until
from tests.support.cluster import HEARTBEAT, THRESHOLD, Cluster, invariant_violations, states_of, wait_for_claims

SLACK = 3.0

REFUSE = {
    "sqlite": ["CREATE TRIGGER refuse_beats BEFORE UPDATE OF last_heartbeat_at ON {t} "
               "BEGIN SELECT RAISE(ABORT, 'heartbeats refused by the test'); END"],
    "postgresql": ["CREATE FUNCTION refuse_beats() RETURNS trigger LANGUAGE plpgsql AS "
                   "$$ BEGIN RAISE EXCEPTION 'heartbeats refused by the test'; END $$",
                   "CREATE TRIGGER refuse_beats BEFORE UPDATE OF last_heartbeat_at ON {t} "
                   "FOR EACH ROW EXECUTE FUNCTION refuse_beats()"],
    "mysql": ["CREATE TRIGGER refuse_beats BEFORE UPDATE ON {t} FOR EACH ROW BEGIN "
              "IF NOT (NEW.last_heartbeat_at <=> OLD.last_heartbeat_at) THEN "
              "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'heartbeats refused by the test'; END IF; END"],
}
REFUSE["mariadb"] = REFUSE["mysql"]
ALLOW = {"sqlite": ["DROP TRIGGER refuse_beats"],
         "postgresql": ["DROP TRIGGER refuse_beats ON {t}", "DROP FUNCTION refuse_beats()"],
         "mysql": ["DROP TRIGGER refuse_beats"], "mariadb": ["DROP TRIGGER refuse_beats"]}


@pytest.fixture
def cluster(tmp_path, db_url):
    c = Cluster(tmp_path, db_url)
    yield c
    c.close()


def _execute(cluster: Cluster, statements: dict[str, list[str]]) -> None:
    engine = create_engine(cluster.db_url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            for sql in statements[engine.dialect.name]:
                conn.execute(text(sql.format(t=cluster.store.t.processes.name)))
    finally:
        engine.dispose()


def test_a_worker_whose_heartbeats_keep_failing_stops_claiming_until_one_gets_through(cluster):
    a = cluster.worker("a")
    cluster.send("before", 0)
    wait_until(lambda: cluster.ended("before", "a"), 30, message="a job to run before the beats fail")

    _execute(cluster, REFUSE)
    stopped = a.wait_log(r"has not heartbeated for more than alive_threshold.*claiming no new jobs",
                         THRESHOLD + HEARTBEAT + SLACK + 10)
    assert "heartbeats refused by the test" in a.log_text()
    cluster.send("meanwhile", 0)
    job = cluster.job_id("meanwhile")
    # Two more refused beats after the send: the claim loop (polling every 0.1 s) had many chances.
    failures = len(re.findall("heartbeat of .* failed", a.log_text()))
    wait_until(lambda: len(re.findall("heartbeat of .* failed", a.log_text())) >= failures + 2, 30,
               message="two more refused heartbeats")
    assert states_of(cluster.snapshot())[job] == "ready"
    assert cluster.started("meanwhile") == []

    _execute(cluster, ALLOW)
    a.wait_log(r"heartbeats again \(process id \d+\): claiming new jobs again", 30)
    wait_until(lambda: cluster.ended("meanwhile", "a"), 30, message="the job published meanwhile to run")
    log = a.log_text()
    assert log.count("claiming no new jobs") == 1 and log.count("claiming new jobs again") == 1, log[-4000:]
    assert stopped.start() < log.index("claiming new jobs again")
    wait_until(lambda: states_of(cluster.snapshot())[job] == "finished", 30, message="its finish recorded")
    assert [m[1] for m in cluster.marks("meanwhile")] == ["start", "end"]
    assert invariant_violations(cluster.snapshot()) == []


def test_a_frozen_worker_never_starts_a_prefetched_job_that_was_released_to_another(cluster):
    # (check_stale_deliveries: on by default)
    a = cluster.worker("a")                     # one pool process: the second job waits in a's hands
    cluster.send("first", 2.0)
    wait_until(lambda: cluster.started("first", "a"), 30, message="the first job to start on a")
    cluster.send("second", 0.2)
    wait_for_claims(cluster, 2, "a", started=1)  # "second" is claimed by a, prefetched, not started
    first, second = cluster.job_id("first"), cluster.job_id("second")

    a.stop()                                    # the whole group: a frozen machine
    b = cluster.worker("b")
    try:
        wait_until(lambda: cluster.ended("second", "b"), THRESHOLD + HEARTBEAT + SLACK + 30, 0.1,
                   "a to be pruned and the released job to run on b")
    finally:
        a.cont()

    a.wait_log(rf"\(job {second}\) not started: its claim under process id \d+ was taken back", 30)
    wait_until(lambda: cluster.ended("first", "a"), 30, message="a's running task to return after SIGCONT")
    wait_until(lambda: states_of(cluster.snapshot())[second] == "finished", 30, message="b's finish recorded")
    assert [(m[1], m[2].split("@")[0]) for m in cluster.marks("second")] == [("start", "b"), ("end", "b")]
    snap = cluster.snapshot()
    assert states_of(snap)[first] == "failed" and snap["failed"][first].error_class == "ProcessPrunedError"
    assert invariant_violations(snap) == []
    assert a.alive() and b.alive()


#: A lock a maintenance chore needs (``fanout.maintain`` reads and expires bindings every run) and a
#: heartbeat does not: held by the test, it stands for a frozen peer's open transaction.
LOCK_BINDINGS = {"postgresql": "LOCK TABLE {t} IN ACCESS EXCLUSIVE MODE", "mysql": "LOCK TABLES {t} WRITE",
                 "mariadb": "LOCK TABLES {t} WRITE"}


def _beats_go_on_while_maintenance_waits_for_a_lock(tmp_path, url: str) -> None:
    cluster = Cluster(tmp_path, url)
    try:
        a = cluster.worker("a")
        cluster.send("before", 0)
        wait_until(lambda: cluster.ended("before", "a"), 30, message="a job to run (the worker is registered)")
        processes = cluster.store.t.processes.name
        watcher = create_engine(url, poolclass=NullPool)
        locker = create_engine(url, poolclass=NullPool)
        try:
            with locker.connect() as held:
                transaction = held.begin()
                held.execute(text(LOCK_BINDINGS[locker.dialect.name].format(t=cluster.store.t.bindings.name)))
                seen: set = set()

                def beats_recorded():
                    with watcher.connect() as conn:
                        seen.add(conn.execute(text(f"SELECT last_heartbeat_at FROM {processes}")).scalar_one())
                    return len(seen) >= 2 + int(THRESHOLD / HEARTBEAT)
                # Beats keep landing well past alive_threshold while the chore waits for the lock.
                wait_until(beats_recorded, THRESHOLD + 4 * HEARTBEAT + SLACK, 0.1,
                           "heartbeats to go on while maintenance waits for a lock")
                transaction.rollback()
        finally:
            locker.dispose()
            watcher.dispose()
        assert "has not heartbeated" not in a.log_text()
        assert a.alive()
    finally:
        cluster.close()


def test_heartbeats_go_on_while_maintenance_waits_for_a_lock_postgres(tmp_path, pg_db_url):
    _beats_go_on_while_maintenance_waits_for_a_lock(tmp_path, pg_db_url)


def test_heartbeats_go_on_while_maintenance_waits_for_a_lock_mariadb(tmp_path, mysql_db_url):
    # (SQLite has one write lock for the whole file: a peer holding it stops every writer, beats included.)
    _beats_go_on_while_maintenance_waits_for_a_lock(tmp_path, mysql_db_url)
