"""Claims: taking ready jobs for a process, and every fenced change to a claimed job.

A claim moves a ready execution to ``claimed_executions``, naming the process
that holds it.  Every later change (started mark, finish, release, fail) is
*fenced*: it names the process that must still hold the claim, and reports
whether it did.  Finishing and pruning both delete the same claim row, so
exactly one of them wins.

The statements are built in ``claim_statements`` (MariaDB's loop in
``claim_packet``); this module runs them.  The claim loop's statements are
prebuilt (``sql.prebuilt``), bind their id lists as one parameter
(``sql.in_ids``) and, on PostgreSQL, run a whole loop (acks, then the next
claim) as one statement (``one_statement``) that the store sends without
BEGIN/COMMIT on the thread's own connection.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Sequence

from sqlalchemy import Integer, bindparam, delete, exists, select, update
from sqlalchemy import Connection

from . import claim_packet, claim_resume, claim_statements as statements, deliveries, unique_keys
from .dialects import Dialect
from .executions import make_ready
from .failed import insert_failed
from .gateway import Gateway
from .schema import Tables
from .sql import by_process, in_ids, prebuilt


@dataclass(frozen=True)
class Claimed:
    """A job this process now holds, as the transport turns it into a kombu message."""
    job_id: int
    queue_name: str
    priority: int
    payload: str
    deliveries: int


Pairs = Sequence[tuple[int, int]]
"""``(job_id, process_id)`` pairs: the acks a loop records."""


def claim(conn: Connection, t: Tables, d: Dialect, *, queues: Sequence[str], limit: int,
          process_id: int, now: datetime, resume: claim_resume.ResumePoint | None = None) -> list[Claimed]:
    """Move up to ``limit`` ready jobs of ``queues`` to claimed by ``process_id``.

    Higher priority first, FIFO within a priority: the ORDER BY is exactly the
    ``ix_*ready_poll`` index.  Paused queues are skipped.  MariaDB, one queue:
    the packet of ``claim_packet``, as in the claim loop.  PostgreSQL, one
    queue: from ``resume``, where the last claim stopped (``claim_resume``).
    """
    if d.loop_packet and claim_packet.usable(queues):
        return _by_packet(conn, t, marks=[], finishes=[], keep=True, queues=queues, limit=limit,
                          process_id=process_id, now=now)[1]
    if d.dml_cte:
        walk, resumed = _walk(t, d, resume, queues)
        rows = conn.execute(prebuilt(t, d, f"claim_in_one_{resumed}", lambda: statements.claim_in_one(t, d, resumed)),
                            {"pid": process_id, "queues": list(queues), "limit": limit, "now": now,
                             **(claim_resume.params(walk, queues[0]) if resumed else {})}).all()
        rows.sort(key=lambda row: (-row.priority, row.id))
        return _resumed(resume, walk, [Claimed(*row) for row in rows])
    if d.delete_returning and d.delete_in_limited_subquery:
        # (Fenced inside: takes nothing unless process_id is registered.)
        taken = conn.execute(prebuilt(t, d, "claim_take", lambda: statements.take(t, d)),
                             {"queues": list(queues), "limit": limit, "pid": process_id}).all()
    else:
        if conn.execute(statements.owner_row(t, d), {"pid": process_id}).first() is None:
            return []
        rows = _take_by_queue(conn, t, d, queues, limit)
        if not rows:
            return []
        job_ids = [row.job_id for row in rows]
        conn.execute(prebuilt(t, d, "claim_insert", lambda: statements.insert_claims(t, d)),
                     {"ids": job_ids, "pid": process_id, "now": now})
        # (The jobs' rows came with the locking read.)
        return [Claimed(row.job_id, row.queue_name, row.priority, row.payload, row.deliveries) for row in rows]
    if not taken:
        return []

    job_ids = [job_id for job_id, _ in taken]
    unique_keys.release(conn, t, d, job_ids=job_ids, claimed_only=True)   # keys held "while waiting"
    conn.execute(prebuilt(t, d, "claim_insert", lambda: statements.insert_claims(t, d)),
                 {"ids": job_ids, "pid": process_id, "now": now})
    rows = conn.execute(prebuilt(t, d, "claim_read", lambda: statements.read_claimed(t, d)), {"ids": job_ids}).all()
    rows.sort(key=lambda row: (-row.priority, row.id))
    return [Claimed(*row) for row in rows]


def _take_by_queue(conn: Connection, t: Tables, d: Dialect, queues: Sequence[str], limit: int) -> list:
    """Lock the next ready rows (and their jobs) one queue at a time, delete the best ``limit`` by primary key (MySQL).

    Returns rows of (id, job_id, queue_name, priority, payload, deliveries: ``deliveries.number``), best first.

    Why one queue at a time: InnoDB locks every row a locking read examines,
    and ``queue_name IN (a, b) ORDER BY priority, job_id`` cannot come out of
    the poll index in order, so it would read, sort and lock every ready row
    of those queues (and a second worker's SKIP LOCKED would then find
    nothing).  ``queue_name = :queue`` walks the index in its own order and
    stops after ``limit`` rows.  Queues go in name order and rows in index
    order, the same for every worker, and the rows are deleted by primary key,
    never by a range (the rule of rails/solid_queue #162, #240).  Rows locked
    beyond the best ``limit`` (several queues) are let go at commit.  A paused
    queue is a primary-key look at ``pauses`` inside the same statement.
    """
    r, p, wanted = t.ready, t.pauses, sorted(set(queues))
    j = t.jobs
    stmt = prebuilt(t, d, "claim_queue", lambda: (
        # (The join's FOR UPDATE locks the job rows too, by primary key after their ready row: MariaDB has
        # no FOR UPDATE OF.  The claim only reads them.)
        select(r.c.id, r.c.job_id, r.c.queue_name, j.c.priority, j.c.payload, deliveries.number(t))
        .join(j, j.c.id == r.c.job_id)
        .where(r.c.queue_name == bindparam("queue"))
        .where(~exists(select(p.c.queue_name).where(p.c.queue_name == bindparam("queue"))))
        .order_by(r.c.priority.desc(), r.c.job_id)
        .limit(bindparam("limit", type_=Integer()))
        .with_for_update(skip_locked=d.skip_locked)))
    rows = []
    for queue in wanted:
        rows += conn.execute(stmt, {"queue": queue, "limit": limit}).all()
    rows = sorted(rows, key=lambda row: (-row.priority, row.job_id))[:limit]
    if rows:
        conn.execute(prebuilt(t, d, "claim_delete", lambda: delete(r).where(r.c.id.in_(bindparam("ids", expanding=True)))),
                     {"ids": sorted(row.id for row in rows)})
    return rows


def _walk(t: Tables, d: Dialect, resume: claim_resume.ResumePoint | None,
          queues: Sequence[str]) -> tuple[claim_resume.Walk | None, bool]:
    """Where a PostgreSQL claim starts: (the walk, True if from a resume point)."""
    if resume is None or len(queues) != 1:
        return None, False
    walk = resume.begin(t)
    return walk, walk.after is not None


def _resumed(resume: claim_resume.ResumePoint | None, walk: claim_resume.Walk | None,
             claimed: list[Claimed]) -> list[Claimed]:
    """``claimed``, after moving ``resume`` past it (``ResumePoint.end``)."""
    if walk is not None:
        resume.end(walk, claimed)
    return claimed


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
        conn.execute(update(t.jobs).where(t.jobs.c.id == job_id).values(finished_at=now, **deliveries.counted(t)))
        conn.execute(delete(t.unique_keys).where(t.unique_keys.c.job_id == job_id))
    else:   # (its unique key goes with the row)
        conn.execute(delete(t.jobs).where(t.jobs.c.id == job_id))
    return True


def finish_many(conn: Connection, t: Tables, d: Dialect, *, claims: Sequence[tuple[int, int]], now: datetime,
                keep: bool) -> list[int]:
    """``finish`` for a batch of ``(job_id, process_id)``: one transaction for many acks.

    Returns the job ids whose claim still stood (and are now finished).
    """
    c = t.claimed
    done: list[int] = []
    for process_id, job_ids in by_process(claims).items():
        if d.delete_returning:
            stmt = prebuilt(t, d, "finish_many", lambda: delete(c).where(statements.held(c, d)).returning(c.c.job_id))
            done += conn.execute(stmt, {"pid": process_id, "ids": job_ids}).scalars().all()
        else:
            held = list(conn.execute(select(c.c.job_id).where(statements.held(c, d)).with_for_update(),
                                     {"pid": process_id, "ids": job_ids}).scalars())
            if held:
                conn.execute(delete(c).where(c.c.job_id.in_(held)))
            done += held
    if done:
        j = t.jobs
        if keep:
            stmt = prebuilt(t, d, "finish_keep", lambda: update(j).where(in_ids(j.c.id, d))
                             .values(finished_at=bindparam("now"), **deliveries.counted(t)))
            conn.execute(stmt, {"ids": done, "now": now})
            unique_keys.release(conn, t, d, job_ids=done)
        else:
            conn.execute(prebuilt(t, d, "finish_drop", lambda: delete(j).where(in_ids(j.c.id, d))), {"ids": done})
    return done


def record_acks(conn: Connection, t: Tables, d: Dialect, *, marks: Sequence[tuple[int, int]],
                finishes: Sequence[tuple[int, int]], now: datetime, keep: bool) -> list[int]:
    """A loop's worth of acks: started marks and finishes of ``(job_id, process_id)``.

    Returns the job ids whose claim still stood and are now finished.  A job
    that started and finished since the last loop only needs its finish (and
    must not be both updated and deleted in one PostgreSQL statement).
    """
    marks = _without_finishing(marks, finishes)
    if d.loop_packet:   # (one round trip and the commit)
        return claim_packet.record_acks(conn, t, marks=marks, finishes=finishes, keep=keep, now=now)
    if not d.dml_cte:
        if marks:
            mark_acked_many(conn, t, d, claims=marks, now=now)
        return finish_many(conn, t, d, claims=finishes, now=now, keep=keep) if finishes else []
    marks_by, finishes_by = by_process(marks), by_process(finishes)
    stmt = prebuilt(t, d, f"acks_in_one_{keep}", lambda: statements.acks_in_one(t, d, keep))
    done: list[int] = []
    for process_id in set(marks_by) | set(finishes_by):
        done += conn.execute(stmt, {"ack_pid": process_id, "now": now, "marks": marks_by.get(process_id, []),
                                    "ids": finishes_by.get(process_id, [])}).scalars().all()
    return done


def acks_and_claim(conn: Connection, t: Tables, d: Dialect, *, marks: Sequence[tuple[int, int]],
                   finishes: Sequence[tuple[int, int]], keep: bool, queues: Sequence[str], limit: int,
                   process_id: int, now: datetime, look: claim_packet.Look | None = None,
                   resume: claim_resume.ResumePoint | None = None) -> tuple[list[int], list[Claimed]]:
    """The claim loop's write: the acks since the last loop, then the next batch.

    Returns (job ids finished, jobs claimed).  On PostgreSQL, when every ack
    names one process id, this is a single statement (``_loop_in_one``), so
    the caller can run it without BEGIN and COMMIT: one round trip per loop.
    On MariaDB, a loop that claims from one queue is one packet of statements
    (``claim_packet``), which also answers ``look``, and is its own transaction
    when ``conn`` is in none (``Store.run(commits_itself=True)``).
    """
    if d.loop_packet and claim_packet.usable(queues):
        return _by_packet(conn, t, marks=marks, finishes=finishes, keep=keep, queues=queues, limit=limit,
                          process_id=process_id, now=now, look=look)
    if not one_statement(d, marks, finishes):
        return record_acks(conn, t, d, marks=marks, finishes=finishes, now=now, keep=keep), \
            claim(conn, t, d, queues=queues, limit=limit, process_id=process_id, now=now, resume=resume)
    if not marks and not finishes:
        return [], claim(conn, t, d, queues=queues, limit=limit, process_id=process_id, now=now, resume=resume)
    marks = _without_finishing(marks, finishes)
    ack_pid = (finishes or marks)[0][1]
    walk, resumed = _walk(t, d, resume, queues)
    stmt = prebuilt(t, d, f"loop_in_one_{keep}_{resumed}", lambda: statements.loop_in_one(t, d, keep, resumed))
    rows = conn.execute(stmt, {
        "pid": process_id, "queues": list(queues), "limit": limit, "now": now, "ack_pid": ack_pid,
        "marks": [job_id for job_id, _ in marks], "ids": [job_id for job_id, _ in finishes],
        **(claim_resume.params(walk, queues[0]) if resumed else {})}).all()
    done = [row.id for row in rows if row.queue_name is None]
    claimed = sorted((row for row in rows if row.queue_name is not None), key=lambda row: (-row.priority, row.id))
    return done, _resumed(resume, walk, [Claimed(*row) for row in claimed])


def _by_packet(conn: Connection, t: Tables, *, marks: Pairs, finishes: Pairs, keep: bool, queues: Sequence[str],
               limit: int, process_id: int, now: datetime, look: claim_packet.Look | None = None
               ) -> tuple[list[int], list[Claimed]]:
    """``acks_and_claim`` through MariaDB's packet (``claim_packet``), from the one queue of ``queues``."""
    done, rows = claim_packet.acks_and_claim(conn, t, marks=_without_finishing(marks, finishes), finishes=finishes,
                                             keep=keep, queue=queues[0], limit=limit, process_id=process_id, now=now,
                                             look=look)
    return done, [Claimed(*row) for row in rows]


def one_statement(d: Dialect, marks: Sequence[tuple[int, int]], finishes: Sequence[tuple[int, int]]) -> bool:
    """True when ``acks_and_claim`` / ``record_acks`` run as a single statement here."""
    return d.dml_cte and len({process_id for _, process_id in (*marks, *finishes)}) <= 1


def _without_finishing(marks: Sequence[tuple[int, int]], finishes: Sequence[tuple[int, int]]) -> list:
    finishing = {job_id for job_id, _ in finishes}
    return [m for m in marks if m[0] not in finishing]


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
    stmt = prebuilt(t, d, "mark_acked_many",
                    lambda: update(c).where(statements.held(c, d)).values(acked_at=bindparam("now")))
    return sum(conn.execute(stmt, {"pid": process_id, "ids": job_ids, "now": now}).rowcount
               for process_id, job_ids in by_process(claims).items())


def release(conn: Connection, t: Tables, d: Dialect, *, job_id: int, process_id: int, now: datetime) -> bool:
    """Claimed → ready, in place (same job row, id and priority), iff we hold it."""
    if not _release_claim(conn, t, job_id, process_id):
        return False
    deliveries.ended(conn, t, [job_id])
    make_ready(conn, t, d, [job_id], now)
    return True


def fail(conn: Connection, t: Tables, *, job_id: int, process_id: int | None, error_class: str,
         error: str, now: datetime) -> bool:
    """Claimed → failed, iff ``process_id`` still holds it (None: the job is ours to fail anyway)."""
    if process_id is not None:
        if not _release_claim(conn, t, job_id, process_id):
            return False
        deliveries.ended(conn, t, [job_id])
    insert_failed(conn, t, [job_id], error_class, error, now)
    return True


def held_since(conn: Connection, t: Tables, *, process_id: int, before: datetime) -> list[int]:
    """Job ids ``process_id`` has held since before ``before`` (for reconciliation)."""
    c = t.claimed
    return list(conn.execute(select(c.c.job_id).where(c.c.process_id == process_id,
                                                      c.c.claimed_at < before)).scalars())


def holds(conn: Connection, t: Tables, *, job_id: int, process_id: int) -> bool:
    """``process_id`` still holds its claim on ``job_id`` (not pruned, released or finished since)."""
    c = t.claimed
    return conn.execute(select(c.c.job_id).where(c.c.job_id == job_id, c.c.process_id == process_id)).first() is not None


def take_unowned(conn: Connection, t: Tables, d: Dialect, *, queues: Sequence[str], limit: int) -> list[Claimed]:
    """Delete and return up to ``limit`` ready jobs of ``queues`` for a consumer that acks nothing.

    A remote-control or events client (``no_ack``) has nothing to give back: what it takes is
    delivered and done, so it needs no claim, and no process row that would outlive it.
    """
    r, j = t.ready, t.jobs
    ids = list(conn.execute(statements.candidate_rows(t, d), {"queues": list(queues), "limit": limit}).scalars())
    if not ids:
        return []
    job_ids = list(conn.execute(select(r.c.job_id).where(r.c.id.in_(ids))).scalars())
    conn.execute(delete(r).where(r.c.id.in_(ids)))
    rows = conn.execute(select(*statements.claimed_columns(t)).where(j.c.id.in_(job_ids))).all()
    conn.execute(delete(j).where(j.c.id.in_(job_ids)))
    rows.sort(key=lambda row: (-row.priority, row.id))
    return [Claimed(*row) for row in rows]


class Claims(Gateway):
    """``store.claims``: claim, acks, release, fenced finish and fail."""

    __slots__ = ()

    def claim(self, *, queues: Sequence[str], limit: int, process_id: int, now: datetime,
              resume: claim_resume.ResumePoint | None = None) -> list[Claimed]:
        return self.store.run(claim, self.t, self.d, queues=queues, limit=limit, process_id=process_id, now=now,
                              resume=resume)

    def take_unowned(self, *, queues: Sequence[str], limit: int) -> list[Claimed]:
        return self.store.run(take_unowned, self.t, self.d, queues=queues, limit=limit)

    def acks_and_claim(self, *, marks: Pairs, finishes: Pairs, keep: bool, queues: Sequence[str], limit: int,
                       process_id: int, now: datetime, look: claim_packet.Look | None = None,
                       resume: claim_resume.ResumePoint | None = None) -> tuple[list[int], list[Claimed]]:
        """The claim loop's write (see ``acks_and_claim``); one round trip on PostgreSQL and on MariaDB."""
        packet = self.d.loop_packet and claim_packet.usable(queues)
        return self.store.run(acks_and_claim, self.t, self.d, marks=marks, finishes=finishes, keep=keep,
                              queues=queues, limit=limit, process_id=process_id, now=now, look=look, resume=resume,
                              single=one_statement(self.d, marks, finishes), kept=True, commits_itself=packet)

    def record_acks(self, *, marks: Pairs, finishes: Pairs, now: datetime, keep: bool) -> list[int]:
        # (Pooled, not the thread's own: a short-lived greenlet's own connection would be left to the GC.)
        return self.store.run(record_acks, self.t, self.d, marks=marks, finishes=finishes, now=now, keep=keep,
                              single=one_statement(self.d, marks, finishes))

    def finish(self, *, job_id: int, process_id: int, now: datetime, keep: bool) -> bool:
        return self.store.run(finish, self.t, job_id=job_id, process_id=process_id, now=now, keep=keep)

    def finish_many(self, *, claims: Pairs, now: datetime, keep: bool) -> list[int]:
        return self.store.run(finish_many, self.t, self.d, claims=claims, now=now, keep=keep)

    def mark_acked(self, *, job_id: int, process_id: int, now: datetime) -> bool:
        return self.store.run(mark_acked, self.t, job_id=job_id, process_id=process_id, now=now)

    def release(self, *, job_id: int, process_id: int, now: datetime) -> bool:
        return self.store.run(release, self.t, self.d, job_id=job_id, process_id=process_id, now=now)

    def fail(self, *, job_id: int, process_id: int | None, error_class: str, error: str, now: datetime) -> bool:
        return self.store.run(fail, self.t, job_id=job_id, process_id=process_id, error_class=error_class,
                              error=error, now=now)

    def held_since(self, *, process_id: int, before: datetime) -> list[int]:
        return self.store.read(held_since, self.t, process_id=process_id, before=before)

    def holds(self, *, job_id: int, process_id: int) -> bool:
        return self.store.read(holds, self.t, job_id=job_id, process_id=process_id)
