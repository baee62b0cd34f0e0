"""Every statement the job queue runs, one named function each.

Each function takes an open connection (inside a transaction the caller owns),
the store's ``Tables`` and ``Dialect``, and plain values.  Nothing here
commits, retries or logs: ``Store`` does that, so this module reads as the
queue's SQL and nothing else.

State changes on a claimed job are *fenced*: they name the process that must
still hold the claim, and report whether it did.  Finishing and pruning both
delete the same ``claimed_executions`` row, so exactly one of them wins.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Iterable, Sequence

from sqlalchemy import (ARRAY, Connection, Executable, Integer, String, TypeDecorator, any_, bindparam, delete, exists, func, insert, literal, null, select, text,
                        union_all, update)

from .dialects import Dialect
from .schema import Tables


@dataclass(frozen=True)
class Claimed:
    job_id: int
    queue_name: str
    priority: int
    payload: str
    deliveries: int


@dataclass(frozen=True)
class Orphan:
    """A claim taken back from a process that is gone."""
    job_id: int
    process_id: int
    acked: bool


def _prebuilt(t: Tables, d: Dialect, name: str, build: Callable[[], Executable]) -> Executable:
    """A statement of the claim loop, built once per store and dialect.

    Why: building a Core statement and its cache key costs a busy worker more
    CPU than SQLite takes to run it, and the worker's main process is
    CPU-bound.  Values go in as bind parameters (``expanding`` for lists).
    """
    key = (name, d.name)
    stmt = t.prebuilt.get(key)
    if stmt is None:
        stmt = t.prebuilt[key] = build()
    return stmt


def _in_ids(col, d: Dialect, name: str = "ids"):
    """``col IN (the list bound as name)``, bound as ``Dialect.id_list`` says."""
    if d.id_list == "array":
        return col == any_(bindparam(name, type_=ARRAY(col.type)))
    if d.id_list == "json":
        return col.in_(select(func.json_each(bindparam(name, type_=_JsonList())).table_valued("value").c.value))
    return col.in_(bindparam(name, expanding=True))


class _JsonList(TypeDecorator):
    """A list of ids bound as one JSON text (for ``json_each``)."""
    impl = String
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return json.dumps(list(value))


# --------------------------------------------------------------------------- enqueue

def enqueue(conn: Connection, t: Tables, d: Dialect, *, queue: str, payload: str, task_name: str | None,
            task_id: str | None, priority: int, now: datetime, eta: datetime | None,
            expires_at: datetime | None) -> int:
    """Insert a job and its ready (or, with a future ETA, scheduled) execution."""
    job_id = conn.execute(insert(t.jobs).values(
        queue_name=queue, task_name=task_name, task_id=task_id, priority=priority,
        payload=payload, created_at=now, scheduled_at=eta, expires_at=expires_at,
    )).inserted_primary_key[0]
    if eta is not None and eta > now:
        conn.execute(insert(t.scheduled).values(
            job_id=job_id, queue_name=queue, priority=priority, scheduled_at=eta))
    else:
        conn.execute(insert(t.ready).values(
            job_id=job_id, queue_name=queue, priority=priority, created_at=now))
        notify_ready(conn, d, queue)
    return job_id


def notify_ready(conn: Connection, d: Dialect, queue: str) -> None:
    """Wake idle workers on commit (PostgreSQL); a rolled-back enqueue sends nothing."""
    if d.notify:
        conn.execute(text("SELECT pg_notify(:channel, :queue)"), {"channel": NOTIFY_CHANNEL, "queue": queue})


NOTIFY_CHANNEL = "sqlq_ready"


# --------------------------------------------------------------------------- claim

def claim(conn: Connection, t: Tables, d: Dialect, *, queues: Sequence[str], limit: int,
          process_id: int, now: datetime) -> list[Claimed]:
    """Move up to ``limit`` ready jobs of ``queues`` to claimed by ``process_id``.

    Higher priority first, FIFO within a priority: the ORDER BY is exactly the
    ``ix_*ready_poll`` index.  Paused queues are skipped.
    """
    if d.dml_cte:
        rows = conn.execute(_prebuilt(t, d, "claim_in_one", lambda: _claim_in_one(t, d)),
                            {"pid": process_id, "queues": list(queues), "limit": limit, "now": now}).all()
        rows.sort(key=lambda row: (-row.priority, row.id))
        return [Claimed(*row) for row in rows]
    if d.delete_returning and d.delete_in_limited_subquery:
        # (Fenced inside: takes nothing unless process_id is registered.)
        taken = conn.execute(_prebuilt(t, d, "claim_take", lambda: _claim_take(t, d)),
                             {"queues": list(queues), "limit": limit, "pid": process_id}).all()
    else:
        if conn.execute(_claim_owner(t, d), {"pid": process_id}).first() is None:
            return []
        r = t.ready
        ids = [row.id for row in conn.execute(_claim_candidates(t, d), {"queues": list(queues), "limit": limit})]
        rows = conn.execute(select(r.c.id, r.c.job_id, r.c.queue_name).where(r.c.id.in_(ids))).all()
        if rows:
            conn.execute(delete(r).where(r.c.id.in_([row.id for row in rows])))
        taken = [(row.job_id, row.queue_name) for row in rows]
    if not taken:
        return []

    job_ids = [job_id for job_id, _ in taken]
    conn.execute(_prebuilt(t, d, "claim_insert", lambda: _claim_insert(t, d)),
                 {"ids": job_ids, "pid": process_id, "now": now})
    if d.update_returning:
        rows = conn.execute(_prebuilt(t, d, "claim_bump", lambda: _claim_bump(t, d).returning(*_claimed_columns(t))),
                            {"ids": job_ids}).all()
    else:
        conn.execute(_prebuilt(t, d, "claim_bump", lambda: _claim_bump(t, d)), {"ids": job_ids})
        rows = conn.execute(select(*_claimed_columns(t)).where(t.jobs.c.id.in_(job_ids))).all()
    rows.sort(key=lambda row: (-row.priority, row.id))
    return [Claimed(*row) for row in rows]


def _claim_owner(t: Tables, d: Dialect):
    # Fenced on the way in too: claims are made only for a registered process,
    # so no claim ever names a pruned one.  FOR KEY SHARE holds the row against
    # a concurrent pruner (whose FOR UPDATE SKIP LOCKED then passes it by)
    # without blocking the process's own heartbeat UPDATE.
    p = t.processes
    owner = select(p.c.id).where(p.c.id == bindparam("pid"))
    return owner.with_for_update(read=True, key_share=True) if d.skip_locked else owner


def _claim_candidates(t: Tables, d: Dialect):
    r = t.ready
    candidates = (
        select(r.c.id)
        .where(r.c.queue_name.in_(bindparam("queues", expanding=True)))
        .where(r.c.queue_name.not_in(select(t.pauses.c.queue_name)))
        .order_by(r.c.priority.desc(), r.c.job_id)
        # A literal: a server-side prepared statement then plans for this
        # limit, not for an unknown one (which PostgreSQL takes as a tenth of the
        # table, and answers with hash joins over whole tables).
        .limit(bindparam("limit", type_=Integer(), literal_execute=d.server_prepared))
    )
    return candidates.with_for_update(skip_locked=True) if d.skip_locked else candidates


def _claim_take(t: Tables, d: Dialect):
    """Delete and return the next ready jobs, if process ``pid`` is registered (SQLite: the
    write lock, taken by BEGIN IMMEDIATE, keeps the registry row from going meanwhile)."""
    r = t.ready
    candidates = _claim_candidates(t, d).where(exists(_claim_owner(t, d)))
    return delete(r).where(r.c.id.in_(candidates.scalar_subquery())).returning(r.c.job_id, r.c.queue_name)


def _claim_insert(t: Tables, d: Dialect):
    """Claims of process ``pid`` on the jobs ``ids``: one INSERT … SELECT, whatever the batch size."""
    c, j = t.claimed, t.jobs
    return insert(c).from_select(
        ["job_id", "process_id", "queue_name", "claimed_at"],
        select(j.c.id, bindparam("pid", type_=c.c.process_id.type), j.c.queue_name,
               bindparam("now", type_=c.c.claimed_at.type)).where(_in_ids(j.c.id, d)))


def _claim_in_one(t: Tables, d: Dialect):
    """The whole claim as one statement (PostgreSQL): fence, take, record, count, return.

        WITH owner AS (SELECT id FROM processes WHERE id = :pid FOR KEY SHARE),
             taken AS (DELETE FROM ready WHERE id IN (<candidates, only if owner exists>)
                       RETURNING job_id, queue_name),
             recorded AS (INSERT INTO claimed SELECT job_id, :pid, queue_name, :now FROM taken)
        UPDATE jobs SET deliveries = deliveries + 1 FROM taken WHERE jobs.id = taken.job_id
        RETURNING <the claimed columns>
    """
    r, j, c = t.ready, t.jobs, t.claimed
    owner = _claim_owner(t, d).cte("owner")
    candidates = _claim_candidates(t, d).where(exists(select(owner.c.id)))
    taken = (delete(r).where(r.c.id.in_(candidates.scalar_subquery()))
             .returning(r.c.job_id, r.c.queue_name).cte("taken"))
    recorded = insert(c).from_select(
        ["job_id", "process_id", "queue_name", "claimed_at"],
        select(taken.c.job_id, bindparam("pid", type_=c.c.process_id.type), taken.c.queue_name,
               bindparam("now", type_=c.c.claimed_at.type)),
    ).cte("recorded")
    return (update(j).where(j.c.id == taken.c.job_id).values(deliveries=j.c.deliveries + 1)
            .returning(*_claimed_columns(t)).add_cte(recorded))


def _claim_bump(t: Tables, d: Dialect):
    j = t.jobs
    return update(j).where(_in_ids(j.c.id, d)).values(deliveries=j.c.deliveries + 1)


def _claimed_columns(t: Tables):
    j = t.jobs
    return (j.c.id, j.c.queue_name, j.c.priority, j.c.payload, j.c.deliveries)


def has_ready(conn: Connection, t: Tables, d: Dialect, *, queues: Sequence[str]) -> bool:
    """A read-only look before a claim, so that idle SQLite polls never take the write lock."""
    def build():
        r = t.ready
        return select(r.c.id).where(r.c.queue_name.in_(bindparam("queues", expanding=True))).limit(1)
    return conn.execute(_prebuilt(t, d, "has_ready", build), {"queues": list(queues)}).first() is not None


# --------------------------------------------------------------------------- fenced state changes

def _release_claim(conn: Connection, t: Tables, job_id: int, process_id: int) -> bool:
    c = t.claimed
    return conn.execute(
        delete(c).where(c.c.job_id == job_id, c.c.process_id == process_id)
    ).rowcount == 1


def finish(conn: Connection, t: Tables, *, job_id: int, process_id: int, now: datetime,
           keep: bool) -> bool:
    """Drop the claim and mark the job finished (or delete it), iff we still hold it."""
    if not _release_claim(conn, t, job_id, process_id):
        return False
    if keep:
        conn.execute(update(t.jobs).where(t.jobs.c.id == job_id).values(finished_at=now))
    else:
        conn.execute(delete(t.jobs).where(t.jobs.c.id == job_id))
    return True


def finish_many(conn: Connection, t: Tables, d: Dialect, *, claims: Sequence[tuple[int, int]], now: datetime,
                keep: bool) -> list[int]:
    """``finish`` for a batch of ``(job_id, process_id)``: one transaction for many acks.

    Returns the job ids whose claim still stood (and are now finished).
    """
    c = t.claimed
    done: list[int] = []
    for process_id, job_ids in _by_process(claims).items():
        if d.delete_returning:
            stmt = _prebuilt(t, d, "finish_many", lambda: delete(c).where(_held(c, d)).returning(c.c.job_id))
            done += conn.execute(stmt, {"pid": process_id, "ids": job_ids}).scalars().all()
        else:
            held = list(conn.execute(select(c.c.job_id).where(_held(c, d)).with_for_update(),
                                     {"pid": process_id, "ids": job_ids}).scalars())
            if held:
                conn.execute(delete(c).where(c.c.job_id.in_(held)))
            done += held
    if done:
        j = t.jobs
        if keep:
            stmt = _prebuilt(t, d, "finish_keep", lambda: update(j).where(_in_ids(j.c.id, d))
                             .values(finished_at=bindparam("now")))
            conn.execute(stmt, {"ids": done, "now": now})
        else:
            conn.execute(_prebuilt(t, d, "finish_drop", lambda: delete(j).where(_in_ids(j.c.id, d))), {"ids": done})
    return done


def record_acks(conn: Connection, t: Tables, d: Dialect, *, marks: Sequence[tuple[int, int]],
                finishes: Sequence[tuple[int, int]], now: datetime, keep: bool) -> list[int]:
    """A loop's worth of acks: started marks and finishes of ``(job_id, process_id)``.

    Returns the job ids whose claim still stood and are now finished.  A job
    that started and finished since the last loop only needs its finish (and
    must not be both updated and deleted in one PostgreSQL statement).
    """
    marks = _without_finishing(marks, finishes)
    if not d.dml_cte:
        if marks:
            mark_acked_many(conn, t, d, claims=marks, now=now)
        return finish_many(conn, t, d, claims=finishes, now=now, keep=keep) if finishes else []
    marks_by, finishes_by = _by_process(marks), _by_process(finishes)
    stmt = _prebuilt(t, d, f"acks_in_one_{keep}", lambda: _acks_in_one(t, d, keep))
    done: list[int] = []
    for process_id in set(marks_by) | set(finishes_by):
        done += conn.execute(stmt, {"ack_pid": process_id, "now": now, "marks": marks_by.get(process_id, []),
                                    "ids": finishes_by.get(process_id, [])}).scalars().all()
    return done


def acks_and_claim(conn: Connection, t: Tables, d: Dialect, *, marks: Sequence[tuple[int, int]],
                   finishes: Sequence[tuple[int, int]], keep: bool, queues: Sequence[str], limit: int,
                   process_id: int, now: datetime) -> tuple[list[int], list[Claimed]]:
    """The claim loop's write: the acks since the last loop, then the next batch.

    Returns (job ids finished, jobs claimed).  On PostgreSQL, when every ack
    names one process id, this is a single statement (``_loop_in_one``), so
    the caller can run it without BEGIN and COMMIT: one round trip per loop.
    """
    if not one_statement(d, marks, finishes):
        return record_acks(conn, t, d, marks=marks, finishes=finishes, now=now, keep=keep), \
            claim(conn, t, d, queues=queues, limit=limit, process_id=process_id, now=now)
    if not marks and not finishes:
        return [], claim(conn, t, d, queues=queues, limit=limit, process_id=process_id, now=now)
    marks = _without_finishing(marks, finishes)
    ack_pid = (finishes or marks)[0][1]
    rows = conn.execute(_prebuilt(t, d, f"loop_in_one_{keep}", lambda: _loop_in_one(t, d, keep)), {
        "pid": process_id, "queues": list(queues), "limit": limit, "now": now, "ack_pid": ack_pid,
        "marks": [job_id for job_id, _ in marks], "ids": [job_id for job_id, _ in finishes]}).all()
    done = [row.id for row in rows if row.queue_name is None]
    claimed = sorted((row for row in rows if row.queue_name is not None), key=lambda row: (-row.priority, row.id))
    return done, [Claimed(*row) for row in claimed]


def one_statement(d: Dialect, marks: Sequence[tuple[int, int]], finishes: Sequence[tuple[int, int]]) -> bool:
    """True when ``acks_and_claim`` / ``record_acks`` run as a single statement here."""
    return d.dml_cte and len({process_id for _, process_id in (*marks, *finishes)}) <= 1


def _without_finishing(marks: Sequence[tuple[int, int]], finishes: Sequence[tuple[int, int]]) -> list:
    finishing = {job_id for job_id, _ in finishes}
    return [m for m in marks if m[0] not in finishing]


def _acks_ctes(t: Tables, d: Dialect, keep: bool):
    """Started marks and finishes of process ``ack_pid``, as data-modifying CTEs (PostgreSQL).

        marked   AS (UPDATE claimed SET acked_at = :now WHERE process_id = :ack_pid AND job_id IN (:marks)),
        done     AS (DELETE FROM claimed WHERE process_id = :ack_pid AND job_id IN (:ids) RETURNING job_id),
        finished AS (UPDATE jobs SET finished_at = :now FROM done WHERE jobs.id = done.job_id RETURNING jobs.id)
                    (or DELETE FROM jobs USING done … when finished jobs are not kept)
    """
    c, j = t.claimed, t.jobs
    marked = update(c).where(_held(c, d, "marks", "ack_pid")).values(acked_at=bindparam("now")).cte("marked")
    done = delete(c).where(_held(c, d, "ids", "ack_pid")).returning(c.c.job_id).cte("done")
    if keep:
        record = update(j).where(j.c.id == done.c.job_id).values(finished_at=bindparam("now"))
    else:
        record = delete(j).where(j.c.id == done.c.job_id)
    return marked, record.returning(j.c.id)


def _acks_in_one(t: Tables, d: Dialect, keep: bool):
    """``record_acks`` for one process as one statement (PostgreSQL): ``_acks_ctes``, returning the finished ids."""
    marked, finished = _acks_ctes(t, d, keep)
    return finished.add_cte(marked)


def _loop_in_one(t: Tables, d: Dialect, keep: bool):
    """``acks_and_claim`` as one statement (PostgreSQL): ``_acks_ctes``, then ``_claim_in_one``.

        WITH <marked, done, finished>, <owner, taken, recorded>,
             bumped AS (UPDATE jobs SET deliveries = deliveries + 1 FROM taken … RETURNING <claimed columns>)
        SELECT <claimed columns> FROM bumped
        UNION ALL SELECT id, NULL, NULL, NULL, NULL FROM finished

    The acks touch only jobs this process holds and the claim only jobs that
    were ready, so no row is modified twice in the one statement.
    """
    marked, finished = _acks_ctes(t, d, keep)
    finished = finished.cte("finished")
    bumped = _claim_in_one(t, d).cte("bumped")
    nothing = null()
    return union_all(
        select(*bumped.c),
        select(finished.c.id, nothing, nothing, nothing, nothing),
    ).add_cte(marked)


def _by_process(claims: Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    by_process: dict[int, list[int]] = {}
    for job_id, process_id in claims:
        by_process.setdefault(process_id, []).append(job_id)
    return by_process


def _held(c, d: Dialect, ids: str = "ids", pid: str = "pid"):
    """Claims named by the list ``ids`` that process ``pid`` still holds (the fence)."""
    return (c.c.process_id == bindparam(pid)) & _in_ids(c.c.job_id, d, ids)


def finish_unclaimed(conn: Connection, t: Tables, *, job_ids: Sequence[int], now: datetime, keep: bool) -> None:
    """Finish jobs that were never claimed (broadcasts consumed with no_ack)."""
    if keep:
        conn.execute(update(t.jobs).where(t.jobs.c.id.in_(job_ids)).values(finished_at=now))
    else:
        conn.execute(delete(t.jobs).where(t.jobs.c.id.in_(job_ids)))


def mark_acked(conn: Connection, t: Tables, *, job_id: int, process_id: int, now: datetime) -> bool:
    """Record an early ack: the job has started and must not silently run twice."""
    c = t.claimed
    return conn.execute(
        update(c).where(c.c.job_id == job_id, c.c.process_id == process_id).values(acked_at=now)
    ).rowcount == 1


def mark_acked_many(conn: Connection, t: Tables, d: Dialect, *, claims: Sequence[tuple[int, int]],
                    now: datetime) -> int:
    """``mark_acked`` for a batch of ``(job_id, process_id)``; returns how many claims still stood."""
    c = t.claimed
    stmt = _prebuilt(t, d, "mark_acked_many", lambda: update(c).where(_held(c, d)).values(acked_at=bindparam("now")))
    return sum(conn.execute(stmt, {"pid": process_id, "ids": job_ids, "now": now}).rowcount
               for process_id, job_ids in _by_process(claims).items())


def release(conn: Connection, t: Tables, d: Dialect, *, job_id: int, process_id: int, now: datetime) -> bool:
    """Claimed → ready, in place (same job row, id and priority), iff we hold it."""
    if not _release_claim(conn, t, job_id, process_id):
        return False
    _make_ready(conn, t, d, [job_id], now)
    return True


def _make_ready(conn: Connection, t: Tables, d: Dialect, job_ids: Sequence[int], now: datetime) -> None:
    j = t.jobs
    conn.execute(insert(t.ready).from_select(
        ["job_id", "queue_name", "priority", "created_at"],
        select(j.c.id, j.c.queue_name, j.c.priority, literal(now, t.ready.c.created_at.type))
        .where(j.c.id.in_(job_ids)),
    ))
    for queue in conn.execute(select(j.c.queue_name).where(j.c.id.in_(job_ids)).distinct()).scalars():
        notify_ready(conn, d, queue)


def fail(conn: Connection, t: Tables, *, job_id: int, process_id: int | None, error_class: str,
         error: str, now: datetime) -> bool:
    """Claimed → failed, iff ``process_id`` still holds it (None: the job is ours to fail anyway)."""
    if process_id is not None and not _release_claim(conn, t, job_id, process_id):
        return False
    _insert_failed(conn, t, [job_id], error_class, error, now)
    return True


def _insert_failed(conn: Connection, t: Tables, job_ids: Sequence[int], error_class: str, error: str,
                   now: datetime) -> None:
    j = t.jobs
    conn.execute(insert(t.failed).from_select(
        ["job_id", "queue_name", "error_class", "error", "failed_at"],
        select(j.c.id, j.c.queue_name, literal(error_class), literal(error),
               literal(now, t.failed.c.failed_at.type))
        .where(j.c.id.in_(job_ids)),
    ))


# --------------------------------------------------------------------------- scheduled

def dispatch_due(conn: Connection, t: Tables, d: Dialect, *, now: datetime, limit: int) -> int:
    """Promote scheduled executions whose time has come to ready."""
    s = t.scheduled
    due = select(s.c.id, s.c.job_id).where(s.c.scheduled_at <= now).order_by(s.c.scheduled_at, s.c.job_id).limit(limit)
    if d.skip_locked:
        due = due.with_for_update(skip_locked=True)
    rows = conn.execute(due).all()
    if not rows:
        return 0
    conn.execute(delete(s).where(s.c.id.in_([row.id for row in rows])))
    _make_ready(conn, t, d, [row.job_id for row in rows], now)
    return len(rows)


def next_scheduled_at(conn: Connection, t: Tables) -> datetime | None:
    return conn.execute(select(func.min(t.scheduled.c.scheduled_at))).scalar()


# --------------------------------------------------------------------------- queues

def ready_count(conn: Connection, t: Tables, *, queue: str) -> int:
    r = t.ready
    return conn.execute(select(func.count()).select_from(r).where(r.c.queue_name == queue)).scalar_one()


def purge(conn: Connection, t: Tables, *, queue: str) -> int:
    """Delete every waiting (ready or scheduled) job of ``queue``; claimed ones are left to finish."""
    j = t.jobs
    waiting = select(t.ready.c.job_id).where(t.ready.c.queue_name == queue).union_all(
        select(t.scheduled.c.job_id).where(t.scheduled.c.queue_name == queue))
    job_ids = list(conn.execute(waiting).scalars())
    for chunk in _chunks(job_ids, 500):
        conn.execute(delete(t.ready).where(t.ready.c.job_id.in_(chunk)))
        conn.execute(delete(t.scheduled).where(t.scheduled.c.job_id.in_(chunk)))
        conn.execute(delete(j).where(j.c.id.in_(chunk)))
    return len(job_ids)


def pause(conn: Connection, t: Tables, *, queue: str, now: datetime) -> None:
    if conn.execute(select(t.pauses.c.queue_name).where(t.pauses.c.queue_name == queue)).first() is None:
        conn.execute(insert(t.pauses).values(queue_name=queue, created_at=now))


def resume(conn: Connection, t: Tables, *, queue: str) -> None:
    conn.execute(delete(t.pauses).where(t.pauses.c.queue_name == queue))


# --------------------------------------------------------------------------- processes

def register_process(conn: Connection, t: Tables, *, kind: str, name: str, hostname: str, pid: int,
                     pool: str | None, concurrency: int | None, queues: str | None, now: datetime) -> int:
    return conn.execute(insert(t.processes).values(
        kind=kind, name=name, hostname=hostname, pid=pid, pool=pool, concurrency=concurrency,
        queues=queues, started_at=now, last_heartbeat_at=now,
    )).inserted_primary_key[0]


def heartbeat(conn: Connection, t: Tables, *, process_id: int, now: datetime) -> bool:
    """One atomic UPDATE; False means the row is gone (we were pruned)."""
    p = t.processes
    return conn.execute(update(p).where(p.c.id == process_id).values(last_heartbeat_at=now)).rowcount == 1


def update_process(conn: Connection, t: Tables, *, process_id: int, **values) -> None:
    conn.execute(update(t.processes).where(t.processes.c.id == process_id).values(**values))


def dead_processes(conn: Connection, t: Tables, d: Dialect, *, cutoff: datetime,
                   exclude: int | None) -> list:
    """Processes whose heartbeat is older than ``cutoff``, locked so only one pruner takes each."""
    p = t.processes
    q = select(p.c.id, p.c.name, p.c.hostname, p.c.pid, p.c.last_heartbeat_at).where(p.c.last_heartbeat_at < cutoff)
    if exclude is not None:
        q = q.where(p.c.id != exclude)
    if d.skip_locked:
        q = q.with_for_update(skip_locked=True)
    return conn.execute(q.order_by(p.c.id)).all()


def delete_process(conn: Connection, t: Tables, *, process_id: int) -> bool:
    return conn.execute(delete(t.processes).where(t.processes.c.id == process_id)).rowcount == 1


def take_claims(conn: Connection, t: Tables, d: Dialect, *, process_ids: Iterable[int] | None) -> list[Orphan]:
    """Delete and return the claims of ``process_ids`` (None: of processes not in the registry)."""
    c = t.claimed
    if process_ids is None:
        where = c.c.process_id.not_in(select(t.processes.c.id))
    else:
        where = c.c.process_id.in_(list(process_ids))
    if d.delete_returning:
        rows = conn.execute(delete(c).where(where).returning(c.c.job_id, c.c.process_id, c.c.acked_at)).all()
    else:
        rows = conn.execute(select(c.c.job_id, c.c.process_id, c.c.acked_at).where(where).with_for_update()).all()
        if rows:
            conn.execute(delete(c).where(c.c.job_id.in_([r.job_id for r in rows])))
    return [Orphan(r.job_id, r.process_id, r.acked_at is not None) for r in rows]


def claims_of(conn: Connection, t: Tables, *, process_id: int, before: datetime) -> list[int]:
    """Job ids ``process_id`` has held since before ``before`` (for reconciliation)."""
    c = t.claimed
    return list(conn.execute(select(c.c.job_id).where(c.c.process_id == process_id,
                                                      c.c.claimed_at < before)).scalars())


def recover(conn: Connection, t: Tables, d: Dialect, *, orphans: Sequence[Orphan], max_releases: int | None,
            error_class: str, error: str, now: datetime) -> tuple[list[int], list[int]]:
    """Release unacked orphans to ready (bounded by ``max_releases``); fail the rest.

    ``max_releases=None``: the claims are given back by their own process on its
    way out, which is no death and does not count toward the bound.
    Returns ``(released_job_ids, failed_job_ids)``.
    """
    if not orphans:
        return [], []
    j = t.jobs
    unacked = [o.job_id for o in orphans if not o.acked]
    if max_releases is None:
        releasable = set(unacked)
    else:
        releasable = set(conn.execute(select(j.c.id).where(
            j.c.id.in_(unacked), j.c.releases < max_releases)).scalars()) if unacked else set()
    released = [o.job_id for o in orphans if o.job_id in releasable]
    failed = [o.job_id for o in orphans if o.job_id not in releasable]
    if released:
        if max_releases is not None:
            conn.execute(update(j).where(j.c.id.in_(released)).values(releases=j.c.releases + 1))
        _make_ready(conn, t, d, released, now)
    over_limit = [o.job_id for o in orphans if not o.acked and o.job_id not in releasable]
    started = [o.job_id for o in orphans if o.acked]
    if started:
        _insert_failed(conn, t, started, error_class, error, now)
    if over_limit:
        _insert_failed(conn, t, over_limit, "MaxReleasesExceeded",
                       f"released {max_releases} times after its worker died; {error}", now)
    return released, failed


# --------------------------------------------------------------------------- failed jobs

def retry_failed(conn: Connection, t: Tables, d: Dialect, *, job_ids: Sequence[int], now: datetime) -> int:
    """Failed → ready, with the same job (and so the same task id)."""
    f = t.failed
    if d.delete_returning:
        # Two concurrent retries of one job: only the one whose DELETE took the row re-queues it.
        taken = list(conn.execute(delete(f).where(f.c.job_id.in_(job_ids)).returning(f.c.job_id)).scalars())
    else:
        taken = list(conn.execute(select(f.c.job_id).where(f.c.job_id.in_(job_ids)).with_for_update()).scalars())
        if taken:
            conn.execute(delete(f).where(f.c.job_id.in_(taken)))
    if not taken:
        return 0
    conn.execute(update(t.jobs).where(t.jobs.c.id.in_(taken)).values(releases=0))
    _make_ready(conn, t, d, taken, now)
    return len(taken)


def discard_failed(conn: Connection, t: Tables, *, job_ids: Sequence[int]) -> int:
    f = t.failed
    taken = list(conn.execute(select(f.c.job_id).where(f.c.job_id.in_(job_ids))).scalars())
    if taken:
        conn.execute(delete(f).where(f.c.job_id.in_(taken)))
        conn.execute(delete(t.jobs).where(t.jobs.c.id.in_(taken)))
    return len(taken)


# --------------------------------------------------------------------------- retention

def clear_finished(conn: Connection, t: Tables, d: Dialect, *, before: datetime, limit: int) -> int:
    """Delete one batch of jobs finished before ``before``; callers loop until 0."""
    j = t.jobs
    return delete_batch(conn, j.c.id, j.c.finished_at.is_not(None), j.c.finished_at < before, limit=limit)


def delete_batch(conn: Connection, key, *conditions, limit: int) -> int:
    """Delete up to ``limit`` rows of ``key``'s table matching ``conditions``; returns how many.

    For clearing history: callers loop until fewer than ``limit`` come back, so
    each transaction stays short and never holds a long lock.
    """
    ids = list(conn.execute(select(key).where(*conditions).limit(limit)).scalars())
    if ids:
        conn.execute(delete(key.table).where(key.in_(ids)))
    return len(ids)


def _chunks(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]



# --------------------------------------------------------------------------- fanout bindings

def bind(conn: Connection, t: Tables, *, exchange: str, queue: str, routing_key: str) -> None:
    b = t.bindings
    exists = conn.execute(select(b.c.id).where(
        b.c.exchange == exchange, b.c.queue_name == queue, b.c.routing_key == routing_key)).first()
    if exists is None:
        conn.execute(insert(b).values(exchange=exchange, queue_name=queue, routing_key=routing_key))


def bound_queues(conn: Connection, t: Tables, *, exchange: str) -> list[str]:
    b = t.bindings
    return list(conn.execute(select(b.c.queue_name).where(b.c.exchange == exchange).distinct()).scalars())


def unbind_queue(conn: Connection, t: Tables, *, queue: str) -> None:
    conn.execute(delete(t.bindings).where(t.bindings.c.queue_name == queue))


# =========================================================================== failed jobs: listing
# (added for celery_sqlbackend.failed; kept at the end so this section is easy to review)

def _filter_failed(q, t: Tables, *, queue: str | None, task_name: str | None, error_class: str | None,
                   failed_before: datetime | None):
    """The filters shared by listing and counting failed jobs (``failed`` joined to ``jobs``)."""
    f, j = t.failed, t.jobs
    if queue is not None:
        q = q.where(f.c.queue_name == queue)
    if task_name is not None:
        q = q.where(j.c.task_name == task_name)
    if error_class is not None:
        q = q.where(f.c.error_class == error_class)
    if failed_before is not None:
        q = q.where(f.c.failed_at < failed_before)
    return q


def failed_jobs(conn: Connection, t: Tables, *, queue: str | None = None, task_name: str | None = None,
                error_class: str | None = None, failed_before: datetime | None = None,
                after_job_id: int | None = None, limit: int | None = None) -> list:
    """Failed jobs with their error, oldest job first, filtered; keyset-paged by ``after_job_id``."""
    f, j = t.failed, t.jobs
    q = (select(f.c.job_id, j.c.task_id, j.c.task_name, f.c.queue_name, f.c.error_class, f.c.error,
                f.c.failed_at, j.c.created_at, j.c.deliveries, j.c.releases)
         .select_from(f.join(j, j.c.id == f.c.job_id)))
    q = _filter_failed(q, t, queue=queue, task_name=task_name, error_class=error_class,
                       failed_before=failed_before)
    if after_job_id is not None:
        q = q.where(f.c.job_id > after_job_id)
    q = q.order_by(f.c.job_id)
    if limit is not None:
        q = q.limit(limit)
    return conn.execute(q).all()


# =========================================================================== operations
# Statements for operating a store: transient (expiring) bindings for remote
# control and events (``fanout``), and the status views of ``admin``/``celery sqlq``.

from sqlalchemy.exc import IntegrityError  # noqa: E402  (operations section)


def bind_queue(conn: Connection, t: Tables, *, exchange: str, queue: str, routing_key: str,
               expires_at: datetime | None) -> None:
    """Insert the binding, or push its expiry forward if it exists."""
    b = t.bindings
    where = (b.c.exchange == exchange, b.c.queue_name == queue, b.c.routing_key == routing_key)
    if conn.execute(update(b).where(*where).values(expires_at=expires_at)).rowcount == 0:
        # Two workers declaring the same queue at once: the loser's insert hits the
        # unique constraint inside a savepoint, and the binding exists either way.
        try:
            with conn.begin_nested():
                conn.execute(insert(b).values(exchange=exchange, queue_name=queue, routing_key=routing_key,
                                              expires_at=expires_at))
        except IntegrityError:
            conn.execute(update(b).where(*where).values(expires_at=expires_at))


def exchange_bindings(conn: Connection, t: Tables, *, exchange: str, now: datetime) -> list[tuple[str, str]]:
    """``(queue, routing_key)`` of the bindings of ``exchange`` that have not expired."""
    b = t.bindings
    rows = conn.execute(select(b.c.queue_name, b.c.routing_key).where(
        b.c.exchange == exchange, (b.c.expires_at.is_(None)) | (b.c.expires_at >= now))).all()
    return [(row.queue_name, row.routing_key) for row in rows]


def touch_bindings(conn: Connection, t: Tables, *, queues: Sequence[str], expires_at: datetime) -> set[str]:
    """Push the expiry of the (expiring) bindings of ``queues`` forward; the queues that had one."""
    b = t.bindings
    found = set(conn.execute(select(b.c.queue_name).where(
        b.c.queue_name.in_(list(queues)), b.c.expires_at.is_not(None)).distinct()).scalars())
    if found:
        conn.execute(update(b).where(b.c.queue_name.in_(found), b.c.expires_at.is_not(None))
                     .values(expires_at=expires_at))
    return found


def expire_bindings(conn: Connection, t: Tables, *, now: datetime) -> list[str]:
    """Delete expired bindings; returns the queues left with no binding at all."""
    b = t.bindings
    queues = list(conn.execute(select(b.c.queue_name).where(b.c.expires_at < now).distinct()).scalars())
    if not queues:
        return []
    conn.execute(delete(b).where(b.c.expires_at < now))
    still = set(conn.execute(select(b.c.queue_name).where(b.c.queue_name.in_(queues)).distinct()).scalars())
    return sorted(q for q in queues if q not in still)


def transient_queues(conn: Connection, t: Tables) -> list[str]:
    b = t.bindings
    return sorted(conn.execute(select(b.c.queue_name).where(b.c.expires_at.is_not(None)).distinct()).scalars())


def drop_waiting(conn: Connection, t: Tables, *, queues: Sequence[str], before: datetime | None,
                 now: datetime, limit: int) -> int:
    """Delete up to ``limit`` ready jobs of ``queues``: all (``before`` None), or stale/expired ones."""
    r, j = t.ready, t.jobs
    q = select(r.c.job_id).join(j, j.c.id == r.c.job_id).where(r.c.queue_name.in_(list(queues)))
    if before is not None:
        q = q.where((r.c.created_at < before) | (j.c.expires_at < now))
    ids = list(conn.execute(q.limit(limit)).scalars())
    if ids:
        conn.execute(delete(r).where(r.c.job_id.in_(ids)))
        conn.execute(delete(j).where(j.c.id.in_(ids)))
    return len(ids)


def trim_backlog(conn: Connection, t: Tables, *, queue: str, keep: int, limit: int) -> int:
    """Delete the oldest ready jobs of ``queue`` beyond the newest ``keep`` (at most ``limit``)."""
    r = t.ready
    waiting = conn.execute(select(func.count()).select_from(r).where(r.c.queue_name == queue)).scalar_one()
    excess = min(waiting - keep, limit)
    if excess <= 0:
        return 0
    ids = list(conn.execute(select(r.c.job_id).where(r.c.queue_name == queue)
                            .order_by(r.c.job_id).limit(excess)).scalars())
    conn.execute(delete(r).where(r.c.job_id.in_(ids)))
    conn.execute(delete(t.jobs).where(t.jobs.c.id.in_(ids)))
    return len(ids)


def queue_stats(conn: Connection, t: Tables) -> dict[str, dict]:
    """Per queue: ready, scheduled, claimed and failed counts, oldest ready time, paused."""
    stats: dict[str, dict] = {}

    def row(queue):
        return stats.setdefault(queue, {"ready": 0, "scheduled": 0, "claimed": 0, "failed": 0,
                                        "oldest_ready_at": None, "paused": False})

    r = t.ready
    for queue, n, oldest in conn.execute(
            select(r.c.queue_name, func.count(), func.min(r.c.created_at)).group_by(r.c.queue_name)):
        row(queue).update(ready=n, oldest_ready_at=oldest)
    for table, key in ((t.scheduled, "scheduled"), (t.claimed, "claimed"), (t.failed, "failed")):
        for queue, n in conn.execute(select(table.c.queue_name, func.count()).group_by(table.c.queue_name)):
            row(queue)[key] = n
    for queue in conn.execute(select(t.pauses.c.queue_name)).scalars():
        row(queue)["paused"] = True
    return stats


def process_list(conn: Connection, t: Tables, *, held_limit: int) -> list[dict]:
    """Registered processes with the jobs each holds (the first ``held_limit`` per process)."""
    p, c, j = t.processes, t.claimed, t.jobs
    procs = [dict(row._mapping) for row in conn.execute(select(p).order_by(p.c.id))]
    counts = dict(conn.execute(select(c.c.process_id, func.count()).group_by(c.c.process_id)).all())
    for proc in procs:
        proc["claimed"] = counts.get(proc["id"], 0)
        proc["held"] = [dict(row._mapping) for row in conn.execute(
            select(c.c.job_id, j.c.task_name, j.c.task_id, c.c.queue_name, c.c.claimed_at, c.c.acked_at)
            .join(j, j.c.id == c.c.job_id).where(c.c.process_id == proc["id"])
            .order_by(c.c.claimed_at, c.c.job_id).limit(held_limit))] if proc["claimed"] else []
    return procs


def paused_queues(conn: Connection, t: Tables) -> list[str]:
    return sorted(conn.execute(select(t.pauses.c.queue_name)).scalars())


def count_failed(conn: Connection, t: Tables, *, queue: str | None = None, task_name: str | None = None,
                 error_class: str | None = None, failed_before: datetime | None = None) -> int:
    """How many failed jobs match (the total behind a progress bar)."""
    f, j = t.failed, t.jobs
    q = select(func.count()).select_from(f.join(j, j.c.id == f.c.job_id))
    q = _filter_failed(q, t, queue=queue, task_name=task_name, error_class=error_class,
                       failed_before=failed_before)
    return conn.execute(q).scalar_one()


def count_finished(conn: Connection, t: Tables, *, before: datetime) -> int:
    j = t.jobs
    return conn.execute(select(func.count()).select_from(j).where(
        j.c.finished_at.is_not(None), j.c.finished_at < before)).scalar_one()


def job_detail(conn: Connection, t: Tables, *, job_id: int) -> dict | None:
    """One job with its state (ready, scheduled, claimed, failed or finished) and failure."""
    j, f = t.jobs, t.failed
    row = conn.execute(select(j).where(j.c.id == job_id)).first()
    if row is None:
        return None
    job = dict(row._mapping)
    failure = conn.execute(select(f.c.error_class, f.c.error, f.c.failed_at).where(f.c.job_id == job_id)).first()
    job["state"] = "finished" if job["finished_at"] is not None else "unknown"
    for table, state in ((t.ready, "ready"), (t.scheduled, "scheduled"), (t.claimed, "claimed"), (f, "failed")):
        if conn.execute(select(table.c.job_id).where(table.c.job_id == job_id)).first() is not None:
            job["state"] = state
    job.update(failure._mapping if failure is not None else {"error_class": None, "error": None, "failed_at": None})
    return job
