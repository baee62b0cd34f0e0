"""Unique jobs' keys: taken at enqueue by the primary key, released with the job's state change.

A key row says "task ``task_id`` holds ``key``".  Taking a key is one write
that either inserts the row or takes over one whose hold is over, decided by
the database under the key's own lock (never read, then write), so of any
number of concurrent producers exactly one wins.  A hold is over when:

* ``expires_at`` has passed (``sqlq_unique_for=<seconds>``), or
* the same task id enqueues again (Celery's ``retry`` re-publishes the running
  task under its id: the new message takes the key over instead of being lost).

Keys held "while waiting" or "while waiting or running" name their job and are
deleted in the transactions that claim (``held_until = 'claimed'``), finish or
fail it (``release``, ``release_cte``), and with the job row (``ON DELETE CASCADE``).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Sequence

from sqlalchemy import Connection, and_, bindparam, delete, insert, or_, select, update

from .dialects import Dialect
from .gateway import Gateway
from .schema import Tables
from .sql import in_ids, prebuilt

#: ``held_until`` values; None means "until ``expires_at``".
CLAIMED = "claimed"
FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class UniqueKey:
    """The key a job is enqueued under, and how long its hold lasts."""
    key: str
    held_until: str | None          # CLAIMED, FINISHED, or None (then ``expires_at`` is set)
    expires_at: datetime | None


def _values(key: UniqueKey, task_id: str, job_id: int, now: datetime) -> dict[str, Any]:
    return {"key": key.key, "task_id": task_id, "job_id": job_id if key.held_until else None,
            "held_until": key.held_until, "expires_at": key.expires_at, "created_at": now}


def _hold_over(k, task_id: str, now: datetime):
    """The existing row ``k`` may be taken over by ``task_id`` (see the module doc)."""
    return or_(and_(k.c.expires_at.is_not(None), k.c.expires_at <= now), k.c.task_id == task_id)


def take(conn: Connection, t: Tables, d: Dialect, *, key: UniqueKey, task_id: str, job_id: int,
         now: datetime) -> bool:
    """Take ``key`` for ``task_id``'s job ``job_id``; False if another task holds it.

    PostgreSQL and SQLite: one ``INSERT … ON CONFLICT DO UPDATE … WHERE <hold over>``.
    MySQL: a conditional takeover ``UPDATE``, then ``INSERT IGNORE``; a
    concurrent producer blocks on the key's row (or index entry) until the
    winner commits, then finds the hold not over.  Neither raises on a taken
    key, so a caller's transaction (``enqueue_in``) is never aborted by one.
    """
    k = t.unique_keys
    values = _values(key, task_id, job_id, now)
    if d.insert_on_conflict is not None:
        stmt = d.insert_on_conflict(k).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=[k.c.key],
            set_={name: stmt.excluded[name] for name in values if name != "key"},
            where=_hold_over(k, task_id, now)).returning(k.c.key)
        return conn.execute(stmt).first() is not None
    taken = conn.execute(update(k).where(k.c.key == key.key, _hold_over(k, task_id, now))
                         .values(**{n: v for n, v in values.items() if n != "key"})).rowcount
    if taken:
        return True
    return conn.execute(insert(k).prefix_with("IGNORE").values(**values)).rowcount == 1


def holder(conn: Connection, t: Tables, d: Dialect, *, key: str) -> str | None:
    """The task id holding ``key`` (a locking read where there are row locks: the latest commit,
    whatever the caller's snapshot)."""
    k = t.unique_keys
    q = select(k.c.task_id).where(k.c.key == key)
    if d.skip_locked:
        q = q.with_for_update(read=True)
    return conn.execute(q).scalar()


def release(conn: Connection, t: Tables, d: Dialect, *, job_ids: Sequence[int], claimed_only: bool = False) -> None:
    """Release the keys held by ``job_ids`` (only those held "while waiting" with ``claimed_only``)."""
    if not job_ids:
        return
    conn.execute(prebuilt(t, d, f"unique_release_{claimed_only}", lambda: _release(t, d, claimed_only)),
                 {"key_ids": list(job_ids)})


def _release(t: Tables, d: Dialect, claimed_only: bool):
    k = t.unique_keys
    stmt = delete(k).where(in_ids(k.c.job_id, d, "key_ids"))
    return stmt.where(k.c.held_until == CLAIMED) if claimed_only else stmt


def release_cte(t: Tables, job_ids: Any, name: str, claimed_only: bool = False):
    """``release`` as a data-modifying CTE for a one-statement claim or finish (PostgreSQL);
    ``job_ids`` is a column of another CTE."""
    k = t.unique_keys
    stmt = delete(k).where(k.c.job_id.in_(select(job_ids)))
    if claimed_only:
        stmt = stmt.where(k.c.held_until == CLAIMED)
    return stmt.cte(name)


def clear_expired(conn: Connection, t: Tables, *, now: datetime, limit: int) -> int:
    """Delete up to ``limit`` keys whose time-limited hold is over; returns how many."""
    k = t.unique_keys
    keys = list(conn.execute(select(k.c.key).where(k.c.expires_at <= now).limit(limit)).scalars())
    if keys:
        conn.execute(delete(k).where(k.c.key.in_(keys), k.c.expires_at <= bindparam("now")), {"now": now})
    return len(keys)


class UniqueKeys(Gateway):
    """``store.unique_keys``: the maintenance of keys (taking and releasing them is part of the
    enqueue, claim, finish and fail transactions: ``jobs``, ``claims``, ``failed``)."""

    __slots__ = ()

    def clear_expired(self, *, now: datetime, limit: int) -> int:
        return self.store.run(clear_expired, self.t, now=now, limit=limit)
