"""Where a published message is written: its own transaction, the caller's, or a batch.

``Channel._put`` hands every message here (``put``), after kombu and Celery
have built it (headers, serialisation, routing).  What happens depends on
the scope the publishing code is in, kept in a context variable (so each
thread and each asyncio task has its own):

* no scope: one transaction per message (``store.jobs.add``: on PostgreSQL one
  round trip);
* ``enqueue_in(session_or_connection)``: through the caller's connection, in
  the caller's transaction: the jobs exist once it commits (PostgreSQL
  delivers the NOTIFY sent inside it at that commit) and never if it rolls back;
* ``batch()`` (``enqueue_many``, and every ``group``/chord apply on this
  transport: ``bulk``): buffered, then written in multi-row INSERTs of at most
  ``CHUNK_ROWS`` rows (``STAGED_CHUNK_ROWS`` when staged), all in ONE transaction (the caller's, inside
  ``enqueue_in``), committed when the outermost batch ends; nothing is
  written if it ends with an exception.  The buffer never holds more than one
  chunk, so a producer's memory does not grow with the size of the batch.

  On SQLite (outside ``enqueue_in``) one transaction would hold the file's
  only write lock for as long as Celery builds the batch's messages, while
  every worker's acks, heartbeats and the chord's own result-backend writes
  wait on it ("database is locked").  There each chunk is *staged* instead:
  its job rows are committed at once, without executions, so no worker can
  see them; the outermost batch ends with one short transaction writing the
  executions of all of them (ready from then on), or, on an exception, one
  deleting the staged rows.  (A producer killed mid-batch leaves staged rows
  that never run.)

  On PostgreSQL (outside ``enqueue_in``) each chunk is sent without waiting
  for the last one's result (``store.pg_bulk.ChunkPipeline``): the server
  inserts one chunk while the next is built.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

from sqlalchemy import Connection
from sqlalchemy.orm import Session

from .errors import SQLQError
from .store import Store
from .store.pg_bulk import ChunkPipeline
from .store.jobs import Enqueued, NewJob, delete_range, insert_many, insert_one, insert_rows, place_range
from .urls import mask, same_database

#: Jobs per multi-row INSERT, and the most a batch buffers before writing.
CHUNK_ROWS = 500
#: ... where each chunk is staged (SQLite: module doc).  Each is a commit of its own, so fewer, larger
#: ones cost less (a 10,000-task group: a fifth faster than chunks of 500), and each holds the file's
#: write lock for about 50 ms.
STAGED_CHUNK_ROWS = 2000
#: ... or this many payload characters, whichever comes first.
CHUNK_CHARS = 4_000_000


class WrongDatabaseError(SQLQError):
    """``enqueue_in`` was given a connection to another database than the broker's."""


class BatchFailedError(SQLQError):
    """A write of this batch failed earlier: nothing of the batch is committed."""


@dataclass
class _Batch:
    """Jobs waiting to be written, per store, and the transactions a batch opened itself."""
    pending: dict[Store, list[NewJob]] = field(default_factory=dict)
    chars: dict[Store, int] = field(default_factory=dict)
    opened: dict[Store, tuple[Connection, Any]] = field(default_factory=dict)
    #: SQLite, outside ``enqueue_in``: id ranges (first, last) of the jobs committed without
    #: executions, made ready at the end.
    staged: dict[Store, list[tuple[int, int]]] = field(default_factory=dict)
    #: PostgreSQL, outside ``enqueue_in``: chunks sent without waiting (``store.pg_bulk.ChunkPipeline``).
    pipelines: dict[Store, ChunkPipeline] = field(default_factory=dict)
    #: The error a write of this batch met.  Its jobs had left the buffer, so the batch must not
    #: commit, even if the publisher goes on: kombu retries a publish that met what it takes for a
    #: connection error (MariaDB reports a violated CHECK so), and the batch would lose a chunk.
    failure: BaseException | None = None

    def check(self) -> None:
        if self.failure is not None:
            raise BatchFailedError(
                f"an earlier write of this batch failed ({type(self.failure).__name__}: {self.failure}); "
                "nothing of the batch is committed: fix the cause and publish it again") from self.failure

    def finish_pipeline(self, store: Store) -> None:
        """Wait for ``store``'s chunks in flight (raising their error) before the connection is used."""
        pipeline = self.pipelines.pop(store, None)
        if pipeline is not None:
            try:
                pipeline.finish()
            except BaseException as exc:
                self.failure = exc
                raise


@dataclass(frozen=True)
class _Scope:
    connection: Connection | None = None    # enqueue_in: the caller's
    batch: _Batch | None = None


log = logging.getLogger("celery_sqlbackend.publishing")

_SCOPE: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar("sqlq_publish_scope", default=None)
_OBSERVED: contextvars.ContextVar[list[tuple[Store, NewJob]] | None] = contextvars.ContextVar(
    "sqlq_publish_observed", default=None)


def _connection_of(target: Session | Connection) -> Connection:
    if isinstance(target, Connection):
        return target
    if isinstance(target, Session):
        return target.connection()    # begins the session's transaction if it has none
    raise TypeError(f"enqueue_in() takes a SQLAlchemy Session or Connection, not {type(target).__name__}")


@contextlib.contextmanager
def enqueue_in(target: Session | Connection) -> Iterator[Connection]:
    """Write every message published to an ``sqlq`` broker inside the block through ``target``'s
    transaction (a ``Session`` or a ``Connection`` on the broker's database).

    The jobs (ready, or scheduled for an ETA/countdown) become visible to
    workers when that transaction commits; a rollback leaves none.  Nested
    blocks are fine: the innermost connection is used.  A group or chord
    applied inside is batched into the same transaction.
    """
    conn = _connection_of(target)
    outer = _SCOPE.get()
    token = _SCOPE.set(_Scope(connection=conn, batch=outer.batch if outer else None))
    try:
        yield conn
    finally:
        _SCOPE.reset(token)


@contextlib.contextmanager
def batch() -> Iterator[None]:
    """Batch every message published inside (see the module doc); joins an enclosing batch."""
    outer = _SCOPE.get()
    if outer is not None and outer.batch is not None:
        yield
        return
    state = _Batch()
    token = _SCOPE.set(_Scope(connection=outer.connection if outer else None, batch=state))
    caller = outer.connection if outer else None
    try:
        yield
        state.check()
        for store in list(state.pending):
            if _stages(store, caller):
                state.staged.setdefault(store, [])   # (its last chunk goes with the executions)
            else:
                _flush(store, state, caller)
        for store in list(state.pipelines):
            state.finish_pipeline(store)
        for conn, transaction in state.opened.values():
            transaction.commit()
        for store in list(state.staged):
            _place_staged(store, state)
    except BaseException as exc:
        for pipeline in state.pipelines.values():
            pipeline.abandon(exc)
        for store, ranges in state.staged.items():
            _drop_staged(store, ranges)
        raise
    finally:
        _SCOPE.reset(token)
        for conn, transaction in state.opened.values():
            if transaction.is_active:
                transaction.rollback()
            conn.close()


def caller_connection(store: Store) -> Connection | None:
    """The connection of the ``enqueue_in`` block in progress, if it is on ``store``'s database:
    the channel's other writes during a publish (a queue's binding) go through it too, since on
    SQLite the caller's transaction may hold the one write lock."""
    scope = _SCOPE.get()
    conn = scope.connection if scope is not None else None
    if conn is None or not (conn.engine is store.engine or same_database(conn.engine.url, store.engine.url)):
        return None
    return conn


@contextlib.contextmanager
def observe() -> Iterator[list[tuple[Store, NewJob]]]:
    """Every job ``put`` inside the block, with its store, in a list (``message_templates`` takes its
    template so); they are written as usual."""
    seen: list[tuple[Store, NewJob]] = []
    token = _OBSERVED.set(seen)
    try:
        yield seen
    finally:
        _OBSERVED.reset(token)


def put(store: Store, job: NewJob) -> Enqueued:
    """Write ``job`` as the current scope says (module doc); a buffered job reports ``Enqueued(None)``."""
    seen = _OBSERVED.get()
    if seen is not None:
        seen.append((store, job))
    scope = _SCOPE.get()
    if scope is None:
        return store.jobs.add(job)
    caller = scope.connection
    if caller is not None:
        _check_database(caller, store)
    state = scope.batch
    if state is None:
        return insert_one(caller, store.t, store.dialect, job)
    state.check()
    if job.unique is not None or job.limits is not None:
        # Its outcome decides what apply_async returns (a limit: whether it waits), so it is
        # written now, after the jobs buffered before it (first in, first out).
        _flush(store, state, caller)
        if _stages(store, caller):   # (committed at once: it holds its key from now on)
            return store.run(insert_one, store.t, store.dialect, job)
        state.finish_pipeline(store)
        return insert_one(_batch_connection(store, state, caller), store.t, store.dialect, job)
    pending = state.pending.setdefault(store, [])
    pending.append(job)
    state.chars[store] = state.chars.get(store, 0) + len(job.payload)
    if (len(pending) >= (STAGED_CHUNK_ROWS if _stages(store, caller) else CHUNK_ROWS)
            or state.chars[store] >= CHUNK_CHARS):
        _flush(store, state, caller)
    return Enqueued(None)


def _stages(store: Store, caller: Connection | None) -> bool:
    """This batch stages its chunks on ``store`` (SQLite, no caller's transaction: module doc)."""
    return caller is None and store.dialect.embedded


def _flush(store: Store, state: _Batch, caller: Connection | None) -> None:
    jobs = state.pending.pop(store, None)
    state.chars.pop(store, None)
    if not jobs:
        return
    try:
        _write(store, state, caller, jobs)
    except BaseException as exc:
        state.failure = exc
        raise


def _write(store: Store, state: _Batch, caller: Connection | None, jobs: list[NewJob]) -> None:
    if _stages(store, caller):
        placed = store.run(insert_rows, store.t, store.dialect, jobs)
        # (SQLite: the rows of one transaction got consecutive ids: ``insert_rows``)
        state.staged.setdefault(store, []).append((placed[0].job_id, placed[-1].job_id))
        return
    conn = _batch_connection(store, state, caller)
    pipeline = state.pipelines.get(store)
    if pipeline is None and caller is None and ChunkPipeline.usable(conn, store.dialect, store.pool_mode):
        pipeline = state.pipelines[store] = ChunkPipeline(conn, store.t, store.dialect)
    if pipeline is not None:
        pipeline.send(jobs)
    else:
        insert_many(conn, store.t, store.dialect, jobs)


def _place_staged(store: Store, state: _Batch) -> None:
    """The batch's last chunk and every staged job's execution, in one short transaction."""
    jobs = state.pending.pop(store, None) or []
    state.chars.pop(store, None)

    def place(conn: Connection) -> None:
        ranges = list(state.staged[store])
        placed = insert_rows(conn, store.t, store.dialect, jobs)
        if placed:
            ranges.append((placed[0].job_id, placed[-1].job_id))
        for first, last in ranges:
            place_range(conn, store.t, store.dialect, first, last)

    store.run(place)
    del state.staged[store]


def _drop_staged(store: Store, ranges: list[tuple[int, int]]) -> None:
    try:
        store.run(lambda conn: [delete_range(conn, store.t, first, last) for first, last in ranges])
    except Exception as exc:    # (the batch's own exception is the one to raise)
        log.error("could not delete the staged job rows %s of a failed batch (%s): they will never run",
                  ranges, exc)


def _batch_connection(store: Store, state: _Batch, caller: Connection | None) -> Connection:
    """The caller's connection, or the batch's own transaction on ``store`` (begun on first use)."""
    if caller is not None:
        return caller
    opened = state.opened.get(store)
    if opened is None:
        store.ensure_schema()
        conn = store.engine.connect()
        opened = state.opened[store] = (conn, conn.begin())
    return opened[0]


def _check_database(conn: Connection, store: Store) -> None:
    if conn.engine is store.engine or same_database(conn.engine.url, store.engine.url):
        return
    raise WrongDatabaseError(
        f"enqueue_in() was given a connection to {mask(conn.engine.url)}, but the broker's jobs are in "
        f"{mask(store.engine.url)}: a job written there would never run. Pass a Session or Connection "
        "on the broker's database (or publish outside the enqueue_in block).")
