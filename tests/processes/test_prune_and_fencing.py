"""Pruning, fencing and the process registry, statement by statement, on real databases.

No worker here: each test builds the exact rows a situation leaves behind
(a dead process holding an acked and an unacked claim, a process pruned while
alive, two pruners at once) and checks what the statements do with them.
"""
from __future__ import annotations

import threading
import warnings
from datetime import timedelta

import pytest
from sqlalchemy import event, select, update

from celery_sqlbackend import pruner
from celery_sqlbackend.options import Options
from celery_sqlbackend.processes import LocalProcess
from celery_sqlbackend.store import Store, claims as claim_sql, utcnow

from tests.harness import wait_until
from tests.support.cluster import job_states


@pytest.fixture
def store(db_url):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opts = Options.from_mapping({"create_tables": True, "heartbeat_interval": 0.2, "alive_threshold": 2,
                                     "max_releases": 2, "keep_finished": 3600})
    s = Store(db_url, opts)
    s.create_all()
    yield s
    s.engine.dispose()


def register(store, name="w1", age: float = 0.0) -> int:
    pid = store.processes.register(kind="worker", name=name, hostname="h", pid=1, pool="prefork",
                  concurrency=1, queues='["q"]', now=utcnow())
    if age:
        set_heartbeat_age(store, pid, age)
    return pid


def set_heartbeat_age(store, process_id, age):
    p = store.t.processes
    store.run(lambda c: c.execute(update(p).where(p.c.id == process_id)
                                  .values(last_heartbeat_at=utcnow() - timedelta(seconds=age))))


def enqueue(store, n=1, queue="q") -> list[int]:
    return [store.jobs.enqueue(queue=queue, payload="{}", task_name="t.x", task_id=f"tid-{i}", priority=0,
                    now=utcnow(), eta=None, expires_at=None) for i in range(n)]


def claim(store, process_id, limit=1, queue="q") -> list[int]:
    return [c.job_id for c in store.claims.claim(queues=[queue], limit=limit, process_id=process_id, now=utcnow())]


def failed_rows(store):
    f = store.t.failed
    return store.read(lambda c: {r.job_id: (r.error_class, r.error) for r in c.execute(select(f))})


def process_ids(store):
    return store.read(lambda c: set(c.execute(select(store.t.processes.c.id)).scalars()))


# --------------------------------------------------------------------------- prune


def test_prune_fails_started_jobs_releases_unacked_ones_and_deletes_the_process(store):
    dead = register(store, "dead@h")
    live = register(store, "live@h")
    early, late, other = enqueue(store, 3)
    assert claim(store, dead, 2) == [early, late]
    assert claim(store, live) == [other]
    assert store.claims.mark_acked(job_id=early, process_id=dead, now=utcnow())
    set_heartbeat_age(store, dead, 10)

    report = pruner.prune(store, exclude=live)

    assert report.released == [late] and report.failed == [early]
    assert process_ids(store) == {live}
    states = job_states(store)
    assert states[early] == "failed" and states[late] == "ready" and states[other] == "claimed"
    cls, error = failed_rows(store)[early]
    assert cls == "ProcessPrunedError"
    assert "dead@h" in error and f"process id {dead}" in error and "last heartbeat at" in error
    j = store.t.jobs
    counts = store.read(lambda c: {r.id: (r.deliveries, r.releases)
                                   for r in c.execute(select(j.c.id, j.c.deliveries, j.c.releases))})
    # Both of the dead process's deliveries ended and are counted; only the released one is a release.
    assert counts == {early: (1, 0), late: (1, 1), other: (0, 0)}


def test_prune_leaves_live_processes_and_the_excluded_one_alone(store):
    me = register(store, "me", age=10)   # a stale row that is the caller itself
    live = register(store, "live")
    enqueue(store, 2)
    claim(store, me)
    claim(store, live)
    assert not pruner.prune(store, exclude=me)
    assert process_ids(store) == {me, live}
    assert sorted(job_states(store).values()) == ["claimed", "claimed"]


def test_a_job_released_max_releases_times_is_failed_instead(store):
    [job] = enqueue(store)
    for attempt in range(3):
        dead = register(store, f"dead{attempt}")
        assert claim(store, dead) == [job]
        set_heartbeat_age(store, dead, 10)
        report = pruner.prune(store)
        if attempt < 2:
            assert report.released == [job]
        else:
            assert report.failed == [job]
    cls, error = failed_rows(store)[job]
    assert cls == "MaxReleasesExceeded" and "released 2 times" in error


def test_each_delivery_is_counted_once_whichever_way_it_ends(store):
    """``jobs.deliveries`` counts ended deliveries (``store.deliveries``): a claim only reads the job row and
    delivers number ``deliveries + 1``; a release, a prune, a failure and a finish each count theirs once."""
    j = store.t.jobs

    def counts():
        return store.read(lambda c: {r.id: (r.deliveries, r.releases)
                                     for r in c.execute(select(j.c.id, j.c.deliveries, j.c.releases))})

    def delivered(process_id, *, finishes=()):
        done, got = store.claims.acks_and_claim(marks=[], finishes=list(finishes), keep=True, queues=["q"],
                                                limit=1, process_id=process_id, now=utcnow())
        return done, [(c.job_id, c.deliveries) for c in got]

    live = register(store, "live")
    job, other = enqueue(store, 2)
    assert delivered(live) == ([], [(job, 1)])
    assert counts() == {job: (0, 0), other: (0, 0)}                  # a claim writes no job row
    assert store.claims.release(job_id=job, process_id=live, now=utcnow())
    assert counts()[job] == (1, 0)
    dead = register(store, "dead")
    assert delivered(dead) == ([], [(job, 2)])                        # redelivered
    set_heartbeat_age(store, dead, 10)
    assert pruner.prune(store).released == [job]
    assert counts()[job] == (2, 1)                                    # counted with the release
    assert delivered(live) == ([], [(job, 3)])
    assert delivered(live, finishes=[(job, live)]) == ([job], [(other, 1)])
    assert store.claims.fail(job_id=other, process_id=live, error_class="Boom", error="boom", now=utcnow())
    assert counts() == {job: (3, 1), other: (1, 0)}
    assert job_states(store) == {job: "finished", other: "failed"}


def test_two_pruners_at_once_prune_each_dead_process_exactly_once(store):
    dead = [register(store, f"dead{i}") for i in range(6)]
    jobs = enqueue(store, 12)
    for i, pid in enumerate(dead):
        claim(store, pid, 2)
        store.claims.mark_acked(job_id=jobs[2 * i], process_id=pid, now=utcnow())
        set_heartbeat_age(store, pid, 10)
    reports, errors = [], []

    def run():
        try:
            reports.append(pruner.prune(store))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    pruned = sorted(name for r in reports for name in r.processes)
    assert len(pruned) == 6, pruned          # none twice, none missed
    assert sorted(j for r in reports for j in r.failed) == jobs[0::2]
    assert sorted(j for r in reports for j in r.released) == jobs[1::2]
    assert process_ids(store) == set()


# --------------------------------------------------------------------------- fencing


def test_a_pruned_process_can_neither_finish_nor_release_nor_fail_nor_ack_its_old_jobs(store):
    dead = register(store)
    early, late = enqueue(store, 2)
    claim(store, dead, 2)
    store.claims.mark_acked(job_id=early, process_id=dead, now=utcnow())
    set_heartbeat_age(store, dead, 10)
    pruner.prune(store)
    before = job_states(store)

    for job in (early, late):
        assert not store.claims.finish(job_id=job, process_id=dead, now=utcnow(), keep=True)
        assert not store.claims.release(job_id=job, process_id=dead, now=utcnow())
        assert not store.claims.fail(job_id=job, process_id=dead, error_class="X", error="x", now=utcnow())
        assert not store.claims.mark_acked(job_id=job, process_id=dead, now=utcnow())
    assert job_states(store) == before == {early: "failed", late: "ready"}


def test_finish_wins_over_a_later_prune_and_the_job_is_never_both(store):
    proc = register(store)
    [job] = enqueue(store)
    claim(store, proc)
    store.claims.mark_acked(job_id=job, process_id=proc, now=utcnow())
    assert store.claims.finish(job_id=job, process_id=proc, now=utcnow(), keep=True)
    set_heartbeat_age(store, proc, 10)
    report = pruner.prune(store)
    assert report.processes and not report.failed and not report.released
    assert job_states(store) == {job: "finished"}


def test_the_same_job_claimed_again_under_a_new_id_is_not_finished_by_the_old_delivery(store):
    """Pruned while alive, re-registered, claimed its own released job again: the old
    delivery's ack (fenced on the id it was claimed under) must not finish the new one."""
    lp = LocalProcess(store)
    lp.describe(kind="worker", name="w@h")
    old = lp.register()
    lp.stop()                                  # drive beats by hand
    [job] = enqueue(store)
    assert claim(store, old) == [job]
    set_heartbeat_age(store, old, 10)
    pruner.prune(store)                        # unacked: released to ready
    assert not lp.beat()                       # finds out, registers afresh
    new = lp.id
    assert new not in (None, old)
    assert claim(store, new) == [job]          # redelivered to the same OS process
    assert not lp.acks.finish(job, old)        # the old delivery completes: fenced
    assert job_states(store) == {job: "claimed"}
    assert lp.acks.finish(job, new)
    assert job_states(store) == {job: "finished"}
    lp.deregister()


def test_early_acked_jobs_are_finished_under_the_id_they_were_claimed_with(store):
    lp = LocalProcess(store)
    first = lp.register()
    lp.stop()
    [job] = enqueue(store)
    claim(store, first)
    lp.acks.started("tag-1", job)
    assert lp.acks.running_jobs == [job]
    set_heartbeat_age(store, first, 10)
    pruner.prune(store)                        # acked: failed
    assert not lp.beat() and lp.id != first
    lp.acks.finish_completed(running=set())    # the task returns: must not finish
    assert job_states(store) == {job: "failed"}
    assert lp.acks.running_jobs == []
    lp.deregister()


@pytest.mark.parametrize("keep", [True, False], ids=["keep-finished", "delete-finished"])
def test_a_loop_of_acks_is_fenced_and_a_job_started_and_finished_together_ends_finished(store, keep):
    """``record_acks``: what a worker's claim loop writes for every ack since the last
    loop (one statement on PostgreSQL, where a row may not be both updated and deleted)."""
    mine, other = register(store, "w1"), register(store, "w2")
    a, b, c, d = enqueue(store, 4)
    assert claim(store, mine, 3) == [a, b, c]
    assert claim(store, other, 1) == [d]
    done = store.claims.record_acks(marks=[(a, mine), (b, mine), (d, mine)],
                   finishes=[(a, mine), (c, mine), (d, mine)], now=utcnow(), keep=keep)
    assert sorted(done) == [a, c]                     # d is not ours: fenced
    states = job_states(store)
    assert {job: states.get(job) for job in (b, d)} == {b: "claimed", d: "claimed"}
    assert {job: states.get(job) for job in (a, c)} == ({a: "finished", c: "finished"} if keep else {a: None, c: None})
    claimed = store.t.claimed
    acked = {row.job_id: row.acked_at is not None
             for row in store.run(lambda conn: conn.execute(select(claimed)).all())}
    assert acked == {b: True, d: False}


def test_a_claim_loop_writes_its_acks_and_takes_the_next_batch_in_one_fenced_write(store):
    """``acks_and_claim``: the acks since the last loop and the next batch together.

    On PostgreSQL it is one statement on an autocommit connection (one round trip);
    elsewhere the same effects in one transaction.  Acks stay fenced either way."""
    mine, other = register(store, "w1"), register(store, "w2")
    a, b, c, d, e, f = enqueue(store, 6)
    assert claim(store, mine, 3) == [a, b, c]
    assert claim(store, other, 1) == [d]
    t, dialect = store.t, store.dialect
    marks, finishes = [(b, mine), (c, mine)], [(a, mine), (c, mine), (d, mine)]   # d is not ours
    seen = []

    def loop(conn):
        seen.append(conn.connection.dbapi_connection)
        return claim_sql.acks_and_claim(conn, t, dialect, marks=marks, finishes=finishes, keep=True, queues=["q"],
                                        limit=2, process_id=mine, now=utcnow())

    store.run(lambda conn: None, single=True)   # (opens the thread's own connection and sets it up)
    statements = []

    def count(conn, cursor, statement, *args):
        statements.append(statement)

    event.listen(store.engine, "before_cursor_execute", count)
    try:
        done, claimed = store.run(loop, single=claim_sql.one_statement(dialect, marks, finishes))
    finally:
        event.remove(store.engine, "before_cursor_execute", count)
    assert sorted(done) == [a, c]
    assert [job.job_id for job in claimed] == [e, f]
    states = job_states(store)
    assert {job: states[job] for job in (a, b, c, d, e, f)} == {
        a: "finished", b: "claimed", c: "finished", d: "claimed", e: "claimed", f: "claimed"}
    cl = store.t.claimed
    rows = {row.job_id: (row.process_id, row.acked_at is not None)
            for row in store.run(lambda conn: conn.execute(select(cl)).all())}
    assert rows == {b: (mine, True), d: (other, False), e: (mine, False), f: (mine, False)}
    if dialect.name == "postgresql":
        assert len(statements) == 1 and seen[0].autocommit   # no BEGIN, no COMMIT: one round trip
        assert not claim_sql.one_statement(dialect, marks, [*finishes, (f, other)])   # two process ids: a transaction
    elif dialect.name == "mariadb":
        assert dialect.loop_packet and statements == []   # one packet on the driver's cursor (claim_packet)
    else:
        assert not claim_sql.one_statement(dialect, marks, finishes)


# --------------------------------------------------------------------------- registry


def test_no_claim_is_made_for_a_process_that_is_not_registered(store):
    proc = register(store)
    set_heartbeat_age(store, proc, 10)
    pruner.prune(store)
    enqueue(store)
    assert claim(store, proc) == []
    assert set(job_states(store).values()) == {"ready"}


def test_a_starting_process_sweeps_claims_of_processes_that_no_longer_exist(store):
    ghost = register(store, "ghost")
    early, late = enqueue(store, 2)
    claim(store, ghost, 2)
    store.claims.mark_acked(job_id=early, process_id=ghost, now=utcnow())
    # The row vanishes without its claims (only possible by hand, or an older version).
    store.run(lambda c: c.execute(store.t.processes.delete()))
    lp = LocalProcess(store)
    lp.register()
    try:
        assert job_states(store) == {early: "failed", late: "ready"}
        assert failed_rows(store)[early][0] == "ProcessMissingError"
    finally:
        lp.stop()
        lp.deregister()


def test_deregister_gives_back_claims_and_deletes_the_row_together(store):
    lp = LocalProcess(store)
    pid = lp.register()
    early, late = enqueue(store, 2)
    claim(store, pid, 2)
    lp.acks.started("t1", early)
    lp.stop()
    lp.deregister(reason="WorkerShutdownError: cold")
    assert process_ids(store) == set()
    assert job_states(store) == {early: "failed", late: "ready"}
    assert failed_rows(store)[early] == ("WorkerShutdownError", "WorkerShutdownError: cold")
    # Given back by its own process on the way out: not a death, so not counted toward max_releases.
    assert store.read(lambda c: c.execute(select(store.t.jobs.c.releases)
                                          .where(store.t.jobs.c.id == late)).scalar()) == 0


def test_a_job_given_back_at_exit_more_than_max_releases_times_is_never_failed_for_it(store):
    [job] = enqueue(store)
    for _ in range(store.options.max_releases + 2):
        lp = LocalProcess(store)
        assert claim(store, lp.register()) == [job]
        lp.stop()
        lp.deregister()
    assert job_states(store) == {job: "ready"}


def test_the_heartbeat_thread_beats_every_interval_and_stops_when_told(store):
    lp = LocalProcess(store)
    pid = lp.register()
    p = store.t.processes
    first = store.read(lambda c: c.execute(select(p.c.last_heartbeat_at).where(p.c.id == pid)).scalar())
    wait_until(lambda: lp.beats >= 3, 10, message="three beats")
    last = store.read(lambda c: c.execute(select(p.c.last_heartbeat_at).where(p.c.id == pid)).scalar())
    assert last > first
    lp.stop()
    assert lp._thread is None
    beats = lp.beats
    # stop() joined the thread: nothing can beat any more
    assert lp.beats == beats and lp.last_beat_error is None
    lp.deregister()
    assert process_ids(store) == set()


def test_a_failed_beat_is_retried_and_leaves_nothing_behind(store, monkeypatch):
    lp = LocalProcess(store)
    pid = lp.register()
    lp.stop()
    gateway = type(store.processes)
    real_beat = gateway.heartbeat
    calls = {"n": 0}

    def flaky(self, **kw):
        if calls["n"] == 0:
            calls["n"] += 1
            from sqlalchemy.exc import OperationalError
            raise OperationalError("UPDATE", {}, Exception("database is away"))
        return real_beat(self, **kw)

    monkeypatch.setattr(gateway, "heartbeat", flaky)
    assert not lp.beat()
    assert lp.id == pid and lp.last_beat_error is not None
    assert lp.beat() and lp.id == pid
    lp.deregister()


# --------------------------------------------------------------------------- settings


def test_alive_threshold_under_twice_the_heartbeat_interval_warns():
    with pytest.warns(RuntimeWarning, match="alive_threshold.*twice heartbeat_interval"):
        Options.from_mapping({"heartbeat_interval": 3, "alive_threshold": 5})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Options.from_mapping({"heartbeat_interval": 1, "alive_threshold": 4})
