"""The connection a thread keeps for one-statement writes (``Store.run(single=True)``), on PostgreSQL.

A worker's claim loop writes once per loop; on PostgreSQL that write goes on a
connection the thread keeps, in autocommit, so that no pool checkout (and its
ping) is added to each loop.  These tests pin down what that must not cost:
a connection the server dropped is replaced, and a forked child never closes
the one its parent keeps.
"""
from __future__ import annotations

import gc
import os

import pytest
from sqlalchemy import event, exc as sa_exc, text

from celery_sqlbackend.options import Options
from celery_sqlbackend.store import Store

pytestmark = pytest.mark.postgres


@pytest.fixture
def store(pg_db_url):
    s = Store(pg_db_url, Options(create_tables=True))
    s.create_all()
    yield s
    s.close_own_connection()
    s.engine.dispose()


def backend_pid(store) -> int:
    return store.run(lambda conn: conn.execute(text("SELECT pg_backend_pid()")).scalar(), single=True)


def test_one_statement_writes_reuse_the_threads_connection_and_replace_it_when_the_server_drops_it(store):
    checkouts = []
    event.listen(store.engine.pool, "checkout", lambda *args: checkouts.append(1))
    first = backend_pid(store)
    assert backend_pid(store) == first and backend_pid(store) == first
    assert len(checkouts) == 1                               # kept, not checked out (and pinged) per statement
    with store.engine.connect() as admin:
        admin.execute(text("SELECT pg_terminate_backend(:p)"), {"p": first})
        admin.commit()
    with pytest.raises(sa_exc.DBAPIError):                   # the statement in flight fails, says so...
        backend_pid(store)
    second = backend_pid(store)                              # ...and the next one has a new connection
    assert second != first and backend_pid(store) == second


def test_a_forked_child_opens_its_own_connection_and_leaves_its_parents_open(store):
    parent = backend_pid(store)
    r, w = os.pipe()
    child = os.fork()
    if child == 0:   # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(r)
            mine = backend_pid(store)
            store.close_own_connection()
            gc.collect()     # nothing the child drops may close the parent's connection
            os.write(w, str(mine).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        in_child = int(f.read() or 0)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert in_child and in_child != parent
    assert backend_pid(store) == parent                      # still open, still the same


def test_the_claim_loop_walks_the_poll_index_in_order_on_a_table_never_analysed(store):
    """With a backlog in a ready table that has no statistics yet (a new database), PostgreSQL
    plans the claim as "every ready row of the queue, sorted, first n" unless told otherwise:
    a cost that grows with the backlog.  The claim loop's connection must walk the index instead."""
    from celery_sqlbackend.store import utcnow

    with store.engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO sqlq_jobs (queue_name, priority, payload, created_at, deliveries, releases) "
            "SELECT 'celery', g % 3, '{}', now(), 0, 0 FROM generate_series(1, 3000) g"))
        conn.execute(text("INSERT INTO sqlq_ready_executions (job_id, queue_name, priority, created_at) "
                          "SELECT id, queue_name, priority, created_at FROM sqlq_jobs"))
    assert store.run(lambda conn: conn.execute(text(
        "SELECT reltuples FROM pg_class WHERE relname = 'sqlq_ready_executions'")).scalar()) < 0   # never analysed
    process_id = store.processes.register(kind="worker", name="w", hostname="h", pid=1, pool=None,
                         concurrency=None, queues=None, now=utcnow())

    seen = []
    event.listen(store.engine, "before_cursor_execute",
                 lambda conn, cursor, statement, parameters, context, many: seen.append((statement, parameters)))
    _, claimed = store.claims.acks_and_claim(marks=[], finishes=[], keep=False, queues=["celery"], limit=4,
                                             process_id=process_id, now=utcnow())   # (single: one statement)
    assert [job.priority for job in claimed] == [2, 2, 2, 2]
    statement, parameters = seen[-1]

    def explain(conn):
        cursor = conn.connection.driver_connection.cursor()
        cursor.execute("EXPLAIN (FORMAT JSON) " + statement, parameters)
        return cursor.fetchone()[0]
    plan = store.run(explain, single=True)   # the same connection, so its settings apply
    nodes = list(_nodes(plan[0]["Plan"]))
    walks = [node["Node Type"] for node in nodes if node.get("Index Name") == "ix_sqlq_ready_poll"]
    assert walks and set(walks) == {"Index Scan"}, plan   # (a bitmap scan would read every ready row of the queue)
    assert "Sort" not in {node["Node Type"] for node in nodes}, plan


def _nodes(node: dict):
    yield node
    for child in node.get("Plans", ()):
        yield from _nodes(child)


def test_the_claim_loop_is_planned_once_not_at_every_loop_after_an_analyze(store):
    """The claim loop is one statement that psycopg prepares on the server after a few runs.  Left to
    PostgreSQL's ``plan_cache_mode = auto``, a prepared statement is planned afresh for its first five
    executions, and again whenever an ANALYZE invalidates its plan, and may stay on such custom plans
    for good (measured in the snapshot soak: 1.1 ms of planning a loop, the loop twice as slow).  The
    loop's connection forces the generic plan: once made, it is reused, before and after an ANALYZE."""
    from celery_sqlbackend.store import utcnow

    process_id = store.processes.register(kind="worker", name="w", hostname="h", pid=1, pool=None,
                                          concurrency=None, queues=None, now=utcnow())
    for i in range(40):
        store.jobs.enqueue(queue="q", payload="{}", task_name="t.x", task_id=f"t{i}", priority=0, now=utcnow(),
                           eta=None, expires_at=None)
    finishes: list = []
    for round_ in range(20):
        if round_ == 10:
            store.run(lambda conn: conn.execute(text("ANALYZE sqlq_ready_executions, sqlq_jobs, "
                                                     "sqlq_claimed_executions")))
        _, claimed = store.claims.acks_and_claim(marks=[], finishes=finishes, keep=True, queues=["q"], limit=2,
                                                 process_id=process_id, now=utcnow())
        finishes = [(job.job_id, process_id) for job in claimed]
    assert len(finishes) == 2                  # (still claiming after the ANALYZE)

    def plans(conn):
        return conn.execute(text("SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements "
                                 "WHERE statement LIKE '%claimed_executions%'")).all()
    prepared = store.run(plans, single=True)   # (the loop's own connection: prepared statements are per session)
    assert prepared, "the claim loop was never prepared on the server"
    assert all(row.custom_plans == 0 and row.generic_plans >= 1 for row in prepared), prepared
