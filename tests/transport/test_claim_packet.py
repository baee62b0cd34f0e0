"""MariaDB's claim loop as one packet of statements (``store.claim_packet``).

The engine-level claim and fencing tests (``tests/processes/test_prune_and_fencing.py``)
and every real-worker test already run through the packet on MariaDB; these
are the parts only a packet has: a lost lock race in the middle of it, the
per-loop stamp, finishes that delete their jobs, and the multi-queue fallback.
"""
from __future__ import annotations

import threading
import warnings
from dataclasses import replace
from datetime import datetime

import pymysql
import pytest
from sqlalchemy import event, select

from celery_sqlbackend.options import Options
from celery_sqlbackend.store import Store, claim_packet, claims as claim_sql, lock_retries, utcnow

from tests.harness import wait_until
from tests.support.cluster import job_states


@pytest.fixture
def store(mysql_db_url):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opts = Options.from_mapping({"create_tables": True, "keep_finished": 3600, "busy_timeout": 10})
    s = Store(mysql_db_url, opts)
    s.create_all()
    assert s.dialect.loop_packet, "MariaDB through PyMySQL claims with one packet"
    yield s
    s.close_own_connection()   # (the loops of a test run on this thread's own connection)
    s.engine.dispose()


def register(store, name="w1") -> int:
    return store.processes.register(kind="worker", name=name, hostname="h", pid=1, pool="prefork", concurrency=1,
                                    queues='["q"]', now=utcnow())


def enqueue(store, n=1, queue="q", priority=0) -> list[int]:
    return [store.jobs.enqueue(queue=queue, payload="{}", task_name="t.x", task_id=f"{queue}-{priority}-{i}",
                               priority=priority, now=utcnow(), eta=None, expires_at=None) for i in range(n)]


def loop(store, process_id, *, finishes=(), marks=(), limit=2, queues=("q",), keep=True):
    return store.claims.acks_and_claim(marks=list(marks), finishes=list(finishes), keep=keep, queues=list(queues),
                                       limit=limit, process_id=process_id, now=utcnow())


@pytest.mark.parametrize("commits_itself", [False, True], ids=["in_a_transaction", "committing_itself"])
def test_a_lock_wait_inside_the_packet_undoes_its_acks_and_runs_the_whole_loop_again(store, commits_itself):
    """The packet's acks have run when its claim waits for a lock past ``innodb_lock_wait_timeout``.

    The server ends the packet there (1205) and undoes only that statement; the store
    rolls the whole transaction back, acks included, and sends the loop again, which
    finds the lock gone.  Nothing is half-done in between: the other transaction reads
    the job as still claimed, not finished.  The same whether the packet runs in the
    store's transaction or is its own, from ``START TRANSACTION`` to ``COMMIT`` (the
    claim loop's way: ``Store.run(commits_itself=True)``), whose ``COMMIT`` the server
    never reaches."""
    quick = Store(store.url, replace(store.options, busy_timeout=1))   # (a 1 s lock wait)
    mine = register(quick)
    a, b = enqueue(quick, 2)
    assert [job.job_id for job in loop(quick, mine, limit=1)[1]] == [a]
    before = lock_retries.snapshot().get("lock wait timeout", 0)
    attempts, other_error, seen_between = [], [], []
    other = quick.engine.connect()
    other_txn = other.begin()
    p, j = quick.t.processes, quick.t.jobs
    other.execute(select(p.c.id).where(p.c.id == mine).with_for_update())   # the claim's fence waits for this

    def release_after_the_first_attempt_lost():
        try:
            wait_until(lambda: lock_retries.snapshot().get("lock wait timeout", 0) > before, timeout=20)
            seen_between.append(other.execute(select(j.c.finished_at).where(j.c.id == a)).scalar())
            other_txn.commit()
        except Exception as exc:   # (reported by the assertion below)
            other_error.append(exc)
            other_txn.rollback()

    def run_loop(conn):
        attempts.append(1)
        return claim_sql.acks_and_claim(conn, quick.t, quick.dialect, marks=[], finishes=[(a, mine)], keep=True,
                                        queues=["q"], limit=1, process_id=mine, now=utcnow())

    thread = threading.Thread(target=release_after_the_first_attempt_lost)
    thread.start()
    try:
        done, claimed = quick.run(run_loop, kept=True, commits_itself=commits_itself)
    finally:
        thread.join(30)
        other.close()
        quick.engine.dispose()
    assert other_error == []
    assert seen_between == [None], "the first attempt's finish was undone with it"
    assert len(attempts) == 2
    assert done == [a] and [job.job_id for job in claimed] == [b]
    assert {job: state for job, state in job_states(store).items() if job in (a, b)} == {a: "finished", b: "claimed"}
    c = store.t.claimed
    assert store.read(lambda conn: conn.execute(select(c.c.job_id, c.c.process_id)).all()) == [(b, mine)]


def test_a_finish_that_waits_on_a_pruner_holding_its_claim_leaves_the_job_failed_not_also_finished(store):
    """The packet's finish locks each claim before its job (``claim_packet._finish``).

    A pruner that got there first holds the claim; the finish waits for it, and
    once the pruner has failed the job and dropped the claim, the finish's
    ``UPDATE`` finds no claim to join and writes nothing: the job ends failed
    only, and the loop does not report it done."""
    mine = register(store)
    a, b = enqueue(store, 2)
    assert [job.job_id for job in loop(store, mine, limit=1)[1]] == [a]
    c = store.t.claimed
    pruner = store.engine.connect()
    pruner_txn = pruner.begin()
    pruner.execute(select(c.c.job_id).where(c.c.job_id == a).with_for_update())   # the pruner's first step
    outcome = []

    def finish_a():
        try:
            outcome.append(loop(store, mine, finishes=[(a, mine)], limit=1))
        finally:
            store.close_own_connection()   # (the loop ran on this thread's own connection)

    finisher = threading.Thread(target=finish_a)
    finisher.start()
    try:
        # The packet is running, held at the claim's lock, which only the pruner's commit ends.
        finishing = ("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = DATABASE() "
                     "AND COMMAND = 'Query' AND ID <> CONNECTION_ID()")
        wait_until(lambda: store.read(lambda conn: conn.exec_driver_sql(finishing).scalar()) == 1, timeout=20)
        assert claim_sql.fail(pruner, store.t, job_id=a, process_id=mine, error_class="WorkerLostError",
                              error="its worker was pruned", now=utcnow())
        pruner_txn.commit()
    finally:
        if pruner_txn.is_active:
            pruner_txn.rollback()
        pruner.close()
        finisher.join(30)
    (done, claimed), = outcome
    assert done == [] and [job.job_id for job in claimed] == [b]
    assert job_states(store)[a] == "failed"
    j = store.t.jobs
    assert store.read(lambda conn: conn.execute(select(j.c.finished_at).where(j.c.id == a)).scalar()) is None


def test_a_claim_loop_is_one_packet_sent_to_the_server_and_its_own_transaction(store, monkeypatch):
    """The loop's acks, claim, ``START TRANSACTION`` and ``COMMIT`` go as one query: one round trip.

    (Counted where PyMySQL sends a command; what the loop did is read back on another connection.)"""
    mine = register(store)
    a, b = enqueue(store, 2)
    assert [job.job_id for job in loop(store, mine, limit=1)[1]] == [a]   # (opens the loop's own connection)
    sent = []
    real = pymysql.connections.Connection._execute_command

    def counted(self, command, sql):
        sent.append(sql.decode() if isinstance(sql, bytes) else sql)
        return real(self, command, sql)

    monkeypatch.setattr(pymysql.connections.Connection, "_execute_command", counted)
    done, claimed = loop(store, mine, finishes=[(a, mine)], limit=1)
    monkeypatch.undo()
    assert done == [a] and [job.job_id for job in claimed] == [b]
    assert len(sent) == 1 and sent[0].startswith("START TRANSACTION") and sent[0].endswith("COMMIT")
    assert {job: state for job, state in job_states(store).items() if job in (a, b)} == {a: "finished", b: "claimed"}


def test_each_loop_of_a_process_has_its_own_stamp_even_within_one_microsecond():
    now = datetime(2026, 12, 2, 9, 0, 0, 5)
    first, second = claim_packet._loop_stamp(991, now), claim_packet._loop_stamp(991, now)
    assert first == now and second > first
    assert claim_packet._loop_stamp(992, now) == now   # another process: its own sequence


def test_loops_in_the_same_microsecond_take_only_their_own_claims(store):
    """Two loops stamped from one clock reading: the second returns its own job, not the first's again."""
    mine = register(store)
    a, b = enqueue(store, 2)
    frozen = utcnow()
    first = store.claims.acks_and_claim(marks=[], finishes=[], keep=True, queues=["q"], limit=1, process_id=mine,
                                        now=frozen)[1]
    second = store.claims.acks_and_claim(marks=[], finishes=[], keep=True, queues=["q"], limit=1, process_id=mine,
                                         now=frozen)[1]
    assert [job.job_id for job in first] == [a] and [job.job_id for job in second] == [b]
    assert [job.deliveries for job in first + second] == [1, 1]


def test_finishes_that_do_not_keep_jobs_delete_them_and_their_unique_keys(store):
    mine, other = register(store, "w1"), register(store, "w2")
    a, b, c = enqueue(store, 3)
    k = store.t.unique_keys
    store.run(lambda conn: conn.execute(k.insert(), [{"key": "ka", "task_id": "q-0-0", "job_id": a,
                                                      "held_until": "finished", "created_at": utcnow()}]))
    assert [job.job_id for job in loop(store, mine, limit=2)[1]] == [a, b]
    assert [job.job_id for job in loop(store, other, limit=1)[1]] == [c]
    done, claimed = loop(store, mine, finishes=[(a, mine), (c, mine)], marks=[(b, mine)], limit=1, keep=False)
    assert done == [a] and claimed == []   # c is held by the other process: fenced out
    states = job_states(store)
    assert a not in states and states[b] == "claimed" and states[c] == "claimed"
    assert store.read(lambda conn: conn.execute(select(k.c.key)).all()) == []
    cl = store.t.claimed
    assert store.read(lambda conn: {row.job_id: row.acked_at is not None for row in conn.execute(select(cl))}) == {
        b: True, c: False}


def test_a_worker_of_several_queues_claims_the_best_jobs_across_them_without_the_packet(store):
    """Several queues need the rows in hand to pick the best ``limit`` (``claims._take_by_queue``)."""
    mine = register(store)
    low = enqueue(store, 2, queue="a", priority=0)
    high = enqueue(store, 2, queue="b", priority=5)
    assert not claim_packet.usable(["a", "b"]) and claim_packet.usable(["a", "a"])
    assert [job.job_id for job in loop(store, mine, queues=("a", "b"), limit=3)[1]] == [*high, low[0]]
    assert [job.job_id for job in loop(store, mine, queues=("a",), limit=3)[1]] == [low[1]]


def test_a_paused_queue_and_an_unregistered_process_claim_nothing(store):
    mine = register(store)
    enqueue(store, 1)
    store.queues.pause("q", now=utcnow())
    assert loop(store, mine)[1] == []
    store.queues.resume("q")
    p = store.t.processes
    store.run(lambda conn: conn.execute(p.delete().where(p.c.id == mine)))
    assert loop(store, mine)[1] == []
    assert set(job_states(store).values()) == {"ready"}


def test_acks_no_claim_carries_go_as_a_packet_of_their_own_and_stay_fenced(store):
    """``record_acks`` (the ack writer, the hub between claims): the packet's acks alone, no statement apart."""
    mine, other = register(store, "w1"), register(store, "w2")
    a, b, c = enqueue(store, 3)
    loop(store, mine, limit=2)
    loop(store, other, limit=1)
    statements = []

    def count(conn, cursor, statement, *args):
        statements.append(statement)

    event.listen(store.engine, "before_cursor_execute", count)
    try:
        done = store.claims.record_acks(marks=[(b, mine)], finishes=[(a, mine), (c, mine)], now=utcnow(), keep=True)
        assert store.claims.record_acks(marks=[], finishes=[], now=utcnow(), keep=True) == []
    finally:
        event.remove(store.engine, "before_cursor_execute", count)
    assert done == [a] and statements == []
    assert {job: state for job, state in job_states(store).items()} == {a: "finished", b: "claimed", c: "claimed"}
    cl = store.t.claimed
    assert store.read(lambda conn: {row.job_id: (row.process_id, row.acked_at is not None)
                                    for row in conn.execute(select(cl))}) == {b: (mine, True), c: (other, False)}


def test_a_loop_answers_the_rounds_look_at_the_broadcast_queues_in_its_own_packet(store):
    """After a claim that took jobs, the round looks whether the remote-control queues hold anything
    (a revoke published before those jobs is delivered first: ``claim_round``).  The packet answers
    that look with one more statement after the claim: no round trip of its own."""
    mine = register(store)
    enqueue(store, 2)
    statements = []

    def count(conn, cursor, statement, *args):
        statements.append(statement)

    look = claim_packet.Look(["bq.pidbox", "other.pidbox"])
    event.listen(store.engine, "before_cursor_execute", count)
    try:
        taken = store.claims.acks_and_claim(marks=[], finishes=[], keep=True, queues=["q"], limit=1,
                                            process_id=mine, now=utcnow(), look=look)[1]
    finally:
        event.remove(store.engine, "before_cursor_execute", count)
    assert len(taken) == 1 and look.found is False and statements == []
    enqueue(store, 1, queue="other.pidbox")
    store.claims.acks_and_claim(marks=[], finishes=[], keep=True, queues=["q"], limit=1, process_id=mine,
                                now=utcnow(), look=look)
    assert look.found is True
    several = claim_packet.Look(["other.pidbox"])     # (a claim of several queues sends no packet: no answer)
    store.claims.acks_and_claim(marks=[], finishes=[], keep=True, queues=["q", "r"], limit=1, process_id=mine,
                                now=utcnow(), look=several)
    assert several.found is None
