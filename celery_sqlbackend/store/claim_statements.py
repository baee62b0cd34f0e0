"""The claim's statements, as SQLAlchemy Core: built here, run by ``claims``.

The pieces every engine shares (the fence on the process row, the candidates
in the poll index's order, what a claimed job is read as, the fence on a
claim) and, for PostgreSQL, the claim loop as one statement of data-modifying
CTEs (``loop_in_one``: the acks since the last loop, then the next claim),
which the store sends without BEGIN/COMMIT: one round trip per loop.
MariaDB's loop is a packet of statements instead (``claim_packet``).
"""
from __future__ import annotations

from sqlalchemy import Integer, bindparam, delete, exists, insert, null, select, union_all, update

from . import claim_resume, deliveries, unique_keys
from .dialects import Dialect
from .schema import Tables
from .sql import by_keys, in_ids


def owner_row(t: Tables, d: Dialect):
    """Process ``pid``'s registry row, held against a pruner until the claim commits.

    Fenced on the way in too: claims are made only for a registered process,
    so no claim ever names a pruned one.  FOR KEY SHARE holds the row against
    a concurrent pruner (whose FOR UPDATE SKIP LOCKED then passes it by)
    without blocking the process's own heartbeat UPDATE.
    """
    p = t.processes
    owner = select(p.c.id).where(p.c.id == bindparam("pid"))
    return owner.with_for_update(read=True, key_share=True) if d.skip_locked else owner


def candidate_rows(t: Tables, d: Dialect):
    """Up to ``limit`` ready rows of ``queues`` in the poll index's order, skipping paused queues and rows
    another claim has locked."""
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


def claimed_columns(t: Tables):
    """A claimed job as ``Claimed`` takes it (id, queue, priority, payload, ``deliveries.number``)."""
    j = t.jobs
    return (j.c.id, j.c.queue_name, j.c.priority, j.c.payload, deliveries.number(t))


def read_claimed(t: Tables, d: Dialect):
    """The jobs named by the list ``ids``, as ``claimed_columns``."""
    return select(*claimed_columns(t)).where(in_ids(t.jobs.c.id, d))


def held(c, d: Dialect, ids: str = "ids", pid: str = "pid"):
    """Claims named by the list ``ids`` that process ``pid`` still holds (the fence)."""
    return (c.c.process_id == bindparam(pid)) & in_ids(c.c.job_id, d, ids)


def take(t: Tables, d: Dialect):
    """Delete and return the next ready jobs, if process ``pid`` is registered (SQLite: the
    write lock, taken by BEGIN IMMEDIATE, keeps the registry row from going meanwhile)."""
    r = t.ready
    candidates = candidate_rows(t, d).where(exists(owner_row(t, d)))
    return delete(r).where(r.c.id.in_(candidates.scalar_subquery())).returning(r.c.job_id, r.c.queue_name)


def insert_claims(t: Tables, d: Dialect):
    """Claims of process ``pid`` on the jobs ``ids``: one INSERT … SELECT, whatever the batch size."""
    c, j = t.claimed, t.jobs
    return insert(c).from_select(
        ["job_id", "process_id", "queue_name", "claimed_at"],
        select(j.c.id, bindparam("pid", type_=c.c.process_id.type), j.c.queue_name,
               bindparam("now", type_=c.c.claimed_at.type)).where(in_ids(j.c.id, d)))


def claim_in_one(t: Tables, d: Dialect, resumed: bool = False):
    """The whole claim as one statement (PostgreSQL): fence, take, record, release keys, read back.

        WITH owner AS (SELECT id FROM processes WHERE id = :pid FOR KEY SHARE),
             taken AS (DELETE FROM ready WHERE id IN (<candidates, only if owner exists>)
                       RETURNING job_id, queue_name),
             recorded AS (INSERT INTO claimed SELECT job_id, :pid, queue_name, :now FROM taken),
             unkeyed AS (DELETE FROM unique_keys WHERE held_until = 'claimed' AND job_id IN (SELECT job_id FROM taken))
        SELECT <the claimed columns> FROM jobs WHERE id = ANY(ARRAY(SELECT job_id FROM taken))

    The job rows are only read: the delivery is counted when it ends (``deliveries``).
    """
    r, j, c = t.ready, t.jobs, t.claimed
    owner = owner_row(t, d).cte("owner")
    if resumed:   # (from where the last claim stopped: ``claim_resume``)
        candidates = claim_resume.candidates(t, d, owner)
    else:
        candidates = candidate_rows(t, d).where(exists(select(owner.c.id)))
    taken = (delete(r).where(r.c.id == by_keys(candidates.subquery().c.id))
             .returning(r.c.job_id, r.c.queue_name).cte("taken"))
    recorded = insert(c).from_select(
        ["job_id", "process_id", "queue_name", "claimed_at"],
        select(taken.c.job_id, bindparam("pid", type_=c.c.process_id.type), taken.c.queue_name,
               bindparam("now", type_=c.c.claimed_at.type)),
    ).cte("recorded")
    unkeyed = unique_keys.release_cte(t, taken.c.job_id, "unkeyed", claimed_only=True)
    return (select(*claimed_columns(t)).where(j.c.id == by_keys(taken.c.job_id))
            .add_cte(recorded).add_cte(unkeyed))


def _acks_ctes(t: Tables, d: Dialect, keep: bool):
    """Started marks and finishes of process ``ack_pid``, as data-modifying CTEs (PostgreSQL).

        marked   AS (UPDATE claimed SET acked_at = :now WHERE process_id = :ack_pid AND job_id IN (:marks)),
        done     AS (DELETE FROM claimed WHERE process_id = :ack_pid AND job_id IN (:ids) RETURNING job_id),
        finished AS (UPDATE jobs SET finished_at = :now, deliveries = deliveries + 1
                     WHERE jobs.id = ANY(ARRAY(SELECT job_id FROM done)) RETURNING jobs.id)
                    (or DELETE FROM jobs USING done … when finished jobs are not kept: unique keys go with the rows)
        unkeyed_done AS (DELETE FROM unique_keys WHERE job_id IN (SELECT job_id FROM done))   (kept jobs)
    """
    c, j = t.claimed, t.jobs
    marked = update(c).where(held(c, d, "marks", "ack_pid")).values(acked_at=bindparam("now")).cte("marked")
    done = delete(c).where(held(c, d, "ids", "ack_pid")).returning(c.c.job_id).cte("done")
    if keep:
        record = (update(j).where(j.c.id == by_keys(done.c.job_id))
                  .values(finished_at=bindparam("now"), **deliveries.counted(t))
                  .add_cte(unique_keys.release_cte(t, done.c.job_id, "unkeyed_done")))
    else:
        record = delete(j).where(j.c.id == by_keys(done.c.job_id))
    return marked, record.returning(j.c.id)


def acks_in_one(t: Tables, d: Dialect, keep: bool):
    """``record_acks`` for one process as one statement (PostgreSQL): ``_acks_ctes``, returning the finished ids."""
    marked, finished = _acks_ctes(t, d, keep)
    return finished.add_cte(marked)


def loop_in_one(t: Tables, d: Dialect, keep: bool, resumed: bool = False):
    """``acks_and_claim`` as one statement (PostgreSQL): ``_acks_ctes``, then ``_claim_in_one``.

        WITH <marked, done, finished>, <owner, taken, recorded, unkeyed>,
             claimed AS (SELECT <claimed columns> FROM jobs WHERE id = ANY(ARRAY(SELECT job_id FROM taken)))
        SELECT <claimed columns> FROM claimed
        UNION ALL SELECT id, NULL, NULL, NULL, NULL FROM finished

    The acks touch only jobs this process holds and the claim only jobs that
    were ready, so no row is modified twice in the one statement.
    """
    marked, finished = _acks_ctes(t, d, keep)
    finished = finished.cte("finished")
    claimed = claim_in_one(t, d, resumed).cte("claimed")
    nothing = null()
    return union_all(
        select(*claimed.c),
        select(finished.c.id, nothing, nothing, nothing, nothing),
    ).add_cte(marked)
