"""``enqueue_many`` and groups/chords on this transport: one transaction, multi-row INSERTs, bounded memory."""
from __future__ import annotations

import os
import tracemalloc

import pytest
from celery import chord, group
from sqlalchemy import event

import celery_sqlbackend as sqlq
from celery_sqlbackend.publishing import CHUNK_ROWS, STAGED_CHUNK_ROWS
from celery_sqlbackend.store import store_for
from celery_sqlbackend.store.pg_bulk import ChunkPipeline
from tests.harness import rows


class Statements:
    """What the store's engine sends while it is active: INSERT statements and commits.

    On PostgreSQL a batch's chunks go through psycopg's pipeline, past SQLAlchemy's events
    (``store.pg_bulk.ChunkPipeline``): each chunk sent there is counted as the INSERT it is.
    """

    def __init__(self, engine):
        self.engine, self.inserts, self.commits = engine, 0, 0

    def _execute(self, conn, cursor, statement, parameters, context, executemany):
        self.inserts += statement.lstrip().upper().startswith(("INSERT", "WITH"))

    def _commit(self, conn):
        self.commits += 1

    def __enter__(self):
        event.listen(self.engine, "before_cursor_execute", self._execute)
        event.listen(self.engine, "commit", self._commit)
        self._send = send = ChunkPipeline.send

        def counted(pipeline, jobs):
            self.inserts += bool(jobs)
            return send(pipeline, jobs)

        ChunkPipeline.send = counted
        return self

    def __exit__(self, *exc):
        ChunkPipeline.send = self._send
        event.remove(self.engine, "before_cursor_execute", self._execute)
        event.remove(self.engine, "commit", self._commit)


def _store(module):
    """The broker's store, after a first publish (connection, tables and queue declared: not measured)."""
    module.add.delay(0, 0)
    with module.app.connection_for_write() as conn:
        return conn.default_channel.store


#: Enough jobs for two chunks to be written, whatever the engine's chunk, and some more.
_TWO_CHUNKS_AND_MORE = 2 * max(STAGED_CHUNK_ROWS, CHUNK_ROWS) + 300


def _commits(db_url: str, jobs: int) -> int:
    """One transaction; on SQLite one per staged chunk and the short one that makes them ready."""
    return -(-jobs // STAGED_CHUNK_ROWS) if db_url.startswith("sqlite") else 1


def test_enqueue_many_is_one_transaction_of_multi_row_inserts(app_dir, db_url):
    _, app, _ = app_dir
    store = _store(app)
    with Statements(store.engine) as seen:
        results = sqlq.enqueue_many(app.add.s(i, 1) for i in range(1200))
    assert seen.commits == _commits(db_url, 1200)
    assert 1 <= seen.inserts <= 12, f"{seen.inserts} INSERT statements for 1,200 jobs"
    assert len(results) == 1200
    stored = rows(db_url, "select task_id from sqlq_jobs order by id")[1:]
    assert [r[0] for r in stored] == [r.id for r in results]          # FIFO: in the order given
    assert rows(db_url, "select count(*) from sqlq_ready_executions") == [(1201,)]


def test_a_failure_while_batching_leaves_nothing(app_dir, db_url):
    _, app, _ = app_dir

    def signatures():
        for i in range(_TWO_CHUNKS_AND_MORE):        # two chunks are written before the failure
            yield app.add.s(i, 1)
        raise RuntimeError("the producer's own failure")

    _store(app)
    with pytest.raises(RuntimeError):
        sqlq.enqueue_many(signatures())
    assert rows(db_url, "select count(*) from sqlq_jobs") == [(1,)]


def test_a_batch_in_progress_is_invisible_and_locks_nobody_out(app_dir, db_url):
    """Midway through a batch no job of it can be claimed, and another connection can still write:
    on SQLite a batch holds no write lock while Celery builds its messages (a chord's result-backend
    writes and every worker's acks would wait on it)."""
    _, app, _ = app_dir
    seen = []

    def signatures():
        for i in range(_TWO_CHUNKS_AND_MORE):
            if i == _TWO_CHUNKS_AND_MORE - 200:
                seen.append(rows(db_url, "select count(*) from sqlq_ready_executions"))
                rows(db_url, "update sqlq_jobs set priority = priority where id = 1")   # a write, now
            yield app.add.s(i, 1)

    _store(app)
    results = sqlq.enqueue_many(signatures())
    assert seen == [[(1,)]]
    assert len(results) == _TWO_CHUNKS_AND_MORE
    assert rows(db_url, "select count(*) from sqlq_ready_executions") == [(_TWO_CHUNKS_AND_MORE + 1,)]


def test_groups_and_chords_are_batched_and_keep_their_results(app_dir, db_url, spawn_worker):
    directory, app, _ = app_dir
    store = _store(app)
    with Statements(store.engine) as seen:
        g = group(app.add.s(i, i) for i in range(600)).apply_async()
    assert seen.commits == _commits(db_url, 600) and 1 <= seen.inserts <= 8
    c = chord((app.add.s(i, 1) for i in range(30)), app.total.s()).apply_async()
    in_many = sqlq.enqueue_many([group(app.add.s(1, 1), app.add.s(2, 2)), app.add.s(3, 3)])
    spawn_worker(directory, concurrency=2)
    assert g.get(timeout=120) == [2 * i for i in range(600)]
    assert c.get(timeout=60) == sum(range(1, 31))
    assert in_many[0].get(timeout=60) == [2, 4] and in_many[1].get(timeout=60) == 6


@pytest.mark.timeout(900)
def test_enqueue_many_of_100000_jobs_keeps_the_producer_memory_bounded(app_dir, db_url):
    """Peak traced memory stays well below the payloads written: only a chunk is ever buffered.

    What the producer still holds at the end is what it asked for, the AsyncResults (about 1 KB
    each); the rest of the peak is the transient working set, about one chunk, whatever ``n`` is.
    The suite writes 1,000 jobs of 60,000-character arguments (about 82 MB of payloads): a chunk is
    then bounded by ``CHUNK_CHARS`` (4 MB, ~50 jobs; its transient is ~16 MB on PyMySQL, which copies
    the statement), so the bound shows more clearly than with ten times more small jobs, at a tenth of
    Celery's message building (a few hundred messages per second under tracemalloc).
    ``SQLQ_TEST_BULK_JOBS=100000`` runs the issue's full size, in 2,000-character jobs (chunks of
    ``CHUNK_ROWS``; minutes per engine, too long for every CI run).
    """
    _, app, _ = app_dir
    full = os.environ.get("SQLQ_TEST_BULK_JOBS")
    n, blob = (int(full), "x" * 2000) if full else (1000, "x" * 60_000)
    app.add.delay(0, 0)     # connect and create the tables outside the measurement
    tracemalloc.start(1)
    try:
        results = sqlq.enqueue_many(app.add.s(i, blob) for i in range(n))
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(results) == n
    (count, payload), = rows(db_url, "select count(*), sum(length(payload)) from sqlq_jobs")
    payload = float(payload)     # (MariaDB sums to a Decimal)
    assert count == n + 1
    transient = peak - held
    print(f"{n} jobs: payloads {payload / 1e6:.0f} MB, producer peak {peak / 1e6:.1f} MB "
          f"({held / 1e6:.1f} MB of results held, {transient / 1e6:.1f} MB transient)")
    # About a chunk (500 jobs) and its statement whatever n is; a buffer of the whole batch would be the payloads.
    assert transient < min(32e6, payload / 3), f"{transient / 1e6:.0f} MB transient for {payload / 1e6:.0f} MB"
    if n >= 20_000:
        assert peak < payload / 3, f"peak {peak / 1e6:.0f} MB against {payload / 1e6:.0f} MB of payloads"
