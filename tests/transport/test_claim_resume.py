"""PostgreSQL claims that resume where the last one stopped (``store.claim_resume``).

The engine-level claim, fencing and real-worker tests already claim through a
resume point on PostgreSQL; these are the parts only a resume point has: the
same jobs in the same order as a walk from the start, the jobs it can miss
(made ready behind it, committed late) and when they are found, and the pages a
claim reads while a held snapshot keeps every dead index entry.
"""
from __future__ import annotations

import copy
import json
import warnings

import pytest
from sqlalchemy import create_engine, event, text

from celery_sqlbackend.options import Options
from celery_sqlbackend.store import Store, claim_resume, jobs as job_sql, utcnow
from celery_sqlbackend.store.jobs import NewJob


@pytest.fixture
def store(pg_db_url):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opts = Options.from_mapping({"create_tables": True, "keep_finished": 0})
    s = Store(pg_db_url, opts)
    s.create_all()
    assert s.dialect.dml_cte, "PostgreSQL claims in one statement"
    yield s
    s.engine.dispose()


@pytest.fixture
def no_timed_rewalk(monkeypatch):
    """Walks from the start only when this process made an old job ready (never by the clock)."""
    monkeypatch.setattr(claim_resume, "REWALK_EVERY", 3600.0)


def register(store, name="w1") -> int:
    return store.processes.register(kind="worker", name=name, hostname="h", pid=1, pool="prefork", concurrency=1,
                                    queues='["q"]', now=utcnow())


def enqueue(store, labels, priority=0, queue="q") -> list[int]:
    return [store.jobs.enqueue(queue=queue, payload=json.dumps(label), task_name="t.x", task_id=str(label),
                               priority=priority, now=utcnow(), eta=None, expires_at=None) for label in labels]


def enqueue_many(store, labels) -> None:
    jobs = [NewJob(queue="q", payload=json.dumps(label), task_name="t.x", task_id=label, priority=0,
                   created_at=utcnow()) for label in labels]
    store.run(job_sql.insert_many, store.t, store.dialect, jobs)


def loop(store, pid, point, limit=3, finishes=()):
    done, claimed = store.claims.acks_and_claim(marks=[], finishes=[(job_id, pid) for job_id in finishes], keep=False,
                                                queues=["q"], limit=limit, process_id=pid, now=utcnow(), resume=point)
    return claimed


def drain(store, pid, point, limit=3) -> list[str]:
    """Claim (finishing each batch with the next claim) until nothing comes back; the labels, in claim order."""
    labels, last = [], []
    while True:
        claimed = loop(store, pid, point, limit, finishes=last)
        if not claimed:
            return labels
        labels += [json.loads(job.payload) for job in claimed]
        last = [job.job_id for job in claimed]


def test_resumed_claims_take_what_walks_from_the_start_take_in_the_same_order(store, no_timed_rewalk):
    """Priorities higher first, FIFO within one, across batches that stop inside a priority; a higher
    priority enqueued between two claims is taken next, and lower ones after the resume point's."""
    pid = register(store)
    point = claim_resume.ResumePoint()
    enqueue(store, [f"p0-{i}" for i in range(4)], priority=0)
    enqueue(store, [f"p5-{i}" for i in range(5)], priority=5)
    first = [json.loads(job.payload) for job in loop(store, pid, point)]
    assert first == ["p5-0", "p5-1", "p5-2"]
    assert point.begin(store.t).after is not None, "the next claim resumes"
    enqueue(store, ["p9-0"], priority=9)
    enqueue(store, ["p5-5"], priority=5)
    enqueue(store, ["p-1-0"], priority=-1)
    assert drain(store, pid, point) == ["p9-0", "p5-3", "p5-4", "p5-5", "p0-0", "p0-1", "p0-2", "p0-3", "p-1-0"]


def test_a_job_made_ready_behind_the_point_is_taken_by_the_next_claim(store, no_timed_rewalk):
    """A release puts an old job back (its id is behind the point): the next claim walks from the start."""
    pid = register(store)
    point = claim_resume.ResumePoint()
    ids = enqueue(store, ["a", "b", "c", "d", "e"])
    claimed = loop(store, pid, point, limit=2)
    assert [job.job_id for job in claimed] == ids[:2]
    assert store.claims.release(job_id=ids[0], process_id=pid, now=utcnow())
    assert point.begin(store.t).after is None, "a release here makes the next claim walk from the start"
    assert [json.loads(job.payload) for job in loop(store, pid, point, limit=2)] == ["a", "c"]


def test_a_job_committed_behind_the_point_waits_for_the_next_walk_from_the_start(store, pg_db_url, no_timed_rewalk,
                                                                                 monkeypatch):
    """A job whose id was taken before others but committed after they were claimed (a long
    ``enqueue_in`` transaction) is behind the point: resumed claims pass it by, and the next walk from
    the start takes it.  (This is what the timed walk is for; here its clock is moved by hand.)"""
    pid = register(store)
    point = claim_resume.ResumePoint()
    late = create_engine(pg_db_url)
    try:
        with late.connect() as conn:
            trans = conn.begin()
            conn.execute(text(f"INSERT INTO {store.t.prefix}jobs (queue_name, task_name, task_id, priority, payload,"
                              " created_at, deliveries, releases) VALUES ('q', 't.x', 'late', 0, '\"late\"', now(),"
                              " 0, 0)"))
            late_id = conn.execute(text("SELECT lastval()")).scalar_one()
            enqueue(store, ["x", "y"])
            assert [json.loads(j.payload) for j in loop(store, pid, point, limit=2)] == ["x", "y"]
            conn.execute(text(f"INSERT INTO {store.t.prefix}ready_executions (job_id, queue_name, priority,"
                              " created_at) VALUES (:id, 'q', 0, now())"), {"id": late_id})
            trans.commit()
        enqueue(store, ["z"])
        assert [json.loads(j.payload) for j in loop(store, pid, point)] == ["z"], \
            "a resumed claim starts after the point (if this took 'late', claims do not resume)"
        monkeypatch.setattr(claim_resume, "REWALK_EVERY", 0.0)
        monkeypatch.setattr(claim_resume, "REWALK_COST_SHARE", 0)
        assert [json.loads(j.payload) for j in loop(store, pid, point)] == ["late"]
    finally:
        late.dispose()


def _pages_of_loop(store, pid, point, finishes) -> int:
    """Index pages one claim loop (the finishes of the last batch, then a claim from ``point``) reads to find
    its jobs: its scans of the poll index, or of the job id index, which the planner may take for the part
    after the point.  The loop's own statement on a connection with the claim loop's settings, caught on its
    way to the driver and sent again under EXPLAIN (ANALYZE, BUFFERS); both rolled back.  ``point`` stays put."""
    from celery_sqlbackend.store import claims as claim_sql
    sent = []

    def catch(conn, cursor, statement, parameters, context, executemany):
        sent.append((statement, parameters))

    apart = copy.copy(point)   # (the claim, rolled back, moves this one, not ``point``)
    with store.engine.connect() as conn:
        for setting in store.dialect.own_connection_settings:
            conn.exec_driver_sql(setting)
        conn.commit()
        event.listen(conn, "before_cursor_execute", catch)
        with conn.begin() as trans:
            claim_sql.acks_and_claim(conn, store.t, store.dialect, marks=[], finishes=[(job, pid) for job in finishes],
                                     keep=True, queues=["q"], limit=8, process_id=pid, now=utcnow(), resume=apart)
            trans.rollback()
        event.remove(conn, "before_cursor_execute", catch)
        statement, parameters = sent[-1]
        with conn.begin() as trans:
            plan = conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement, parameters).scalar_one()
            trans.rollback()
    walks = {f"ix_{store.t.prefix}ready_poll", f"uq_{store.t.prefix}ready_job"}
    return sum(node["Shared Hit Blocks"] + node["Shared Read Blocks"] for node in _nodes(plan[0]["Plan"])
               if node.get("Index Name") in walks)


def _nodes(node: dict):
    yield node
    for child in node.get("Plans", ()):
        yield from _nodes(child)


def test_under_a_held_snapshot_a_resumed_claim_reads_the_index_pages_it_read_on_a_fresh_table(store, pg_db_url, no_timed_rewalk):
    """The reason for resume points: 24,000 jobs flow while a REPEATABLE READ transaction holds its
    snapshot, so no index entry of theirs can be removed.  A claim loop walking from the start then reads
    every one; a resumed one reads about as many index pages as on a fresh table."""
    pid = register(store)
    point = claim_resume.ResumePoint()
    holder = create_engine(pg_db_url)
    try:
        with holder.connect() as held:
            held.exec_driver_sql("BEGIN ISOLATION LEVEL REPEATABLE READ")
            held.exec_driver_sql(f"SELECT count(*) FROM {store.t.prefix}jobs").scalar_one()
            fresh = None
            last: list[int] = []
            for chunk in range(60):
                enqueue_many(store, [f"{chunk}-{i}" for i in range(400)])
                if chunk == 1:
                    # (With finishes to write, as every measured loop has.)
                    last = [job.job_id for job in loop(store, pid, point, limit=8, finishes=last)]
                    fresh = _pages_of_loop(store, pid, point, last)
                while True:
                    claimed = loop(store, pid, point, limit=50, finishes=last)
                    last = [job.job_id for job in claimed]
                    if len(claimed) < 50:
                        break
            enqueue_many(store, [f"tail-{i}" for i in range(100)])
            last = [job.job_id for job in loop(store, pid, point, limit=8, finishes=last)]
            resumed = _pages_of_loop(store, pid, point, last)
            assert point.after is not None
            from_start = _pages_of_loop(store, pid, claim_resume.ResumePoint(), last)
            held.exec_driver_sql("ROLLBACK")
    finally:
        holder.dispose()
    pages = f"index pages: fresh {fresh}, resumed {resumed}, from the start {from_start}"
    assert from_start > 10 * fresh, f"the held snapshot should bloat a walk from the start: {pages}"
    assert resumed * 5 < from_start, pages
