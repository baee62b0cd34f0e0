"""Rate keys: the last starts of each key, and the claim of jobs blocked on a rate.

A ``Rate`` job waits blocked (kind "rate") from its enqueue until a worker
claims it here, within the rate: the key's row keeps the claim times of its
last ``max_starts`` starts, so a sliding window of ``period`` never holds more
than ``max_starts`` of them; and ``next_open``, the moment the oldest of those
leaves the window (NULL while no job waits on the key).  Workers read the
smallest ``next_open`` (``next_open``: one index look) and claim only once it
has come, so a key over its rate costs nobody anything meanwhile; jobs keep
their order (priority, then first in, first out) because they stay in
``blocked_executions`` until claimed.

The claim locks each open key's row (``SKIP LOCKED``: workers share keys out,
never wait on one), takes as many of its blocked jobs as the window allows and
the worker has room for, and records them as claims in the same transaction.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Sequence

from sqlalchemy import Connection, exists, func, select, update
from sqlalchemy.dialects import mysql

from . import blocked, claim_statements, unique_keys
from .claims import Claimed
from .dialects import Dialect
from .schema import Tables
from .sql import prebuilt

#: A slot is taken again this fraction of a period after it left the window (``limits.rate.GUARD``).
GUARD = 0.02


def _epoch(at: datetime) -> float:
    return at.replace(tzinfo=timezone.utc).timestamp()


def _at(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, timezone.utc).replace(tzinfo=None)


def waits(conn: Connection, t: Tables, d: Dialect, *, key: str, max_starts: int, period: float,
          now: datetime) -> None:
    """A job now waits on ``key``: create its row, or set its rate (the latest declared applies) and
    mark it open to look at (``next_open``, if unset, becomes now; the claim corrects it)."""
    r = t.rate_keys
    values = {"key": key, "max_starts": max_starts, "period": period, "starts": "[]", "next_open": now,
              "updated_at": now}
    if d.insert_on_conflict is not None:
        stmt = d.insert_on_conflict(r).values(**values)
        conn.execute(stmt.on_conflict_do_update(index_elements=[r.c.key], set_={
            "max_starts": stmt.excluded.max_starts, "period": stmt.excluded.period,
            "updated_at": stmt.excluded.updated_at, "next_open": func.coalesce(r.c.next_open, stmt.excluded.next_open)}))
    else:   # MySQL / MariaDB
        stmt = mysql.insert(r).values(**values)
        conn.execute(stmt.on_duplicate_key_update(
            max_starts=stmt.inserted.max_starts, period=stmt.inserted.period, updated_at=stmt.inserted.updated_at,
            next_open=func.coalesce(r.c.next_open, stmt.inserted.next_open)))


def next_open(conn: Connection, t: Tables) -> datetime | None:
    """The soonest moment a rate key with waiting jobs opens (None: no job waits on a rate)."""
    return conn.execute(select(func.min(t.rate_keys.c.next_open))).scalar()


def claim(conn: Connection, t: Tables, d: Dialect, *, queues: Sequence[str], limit: int, process_id: int,
          now: datetime) -> tuple[list[Claimed], datetime]:
    """Claim up to ``limit`` rate-blocked jobs of ``queues`` for ``process_id``, within their keys' rates;
    returns them and the time their starts were counted at."""
    r, b, p = t.rate_keys, t.blocked, t.processes
    owner = select(p.c.id).where(p.c.id == process_id)
    if d.skip_locked:
        owner = owner.with_for_update(read=True, key_share=True)
    if conn.execute(owner).first() is None:
        return [], now
    waiting = exists(select(b.c.id).where(b.c.kind == blocked.RATE, b.c.key == r.c.key,
                                          b.c.queue_name.in_(list(queues))))
    keys = (select(r.c.key, r.c.max_starts, r.c.period, r.c.starts).where(r.c.next_open <= now, waiting)
            .order_by(r.c.next_open).limit(limit))
    if d.skip_locked:
        keys = keys.with_for_update(skip_locked=True)
    taken: list[int] = []
    locked = conn.execute(keys).all()
    # The time the starts are counted at is read once the keys are locked: ``now`` was read before
    # this transaction waited for its lock (SQLite's write lock), and an early time would let the
    # next window open early.
    now = max(now, datetime.now(timezone.utc).replace(tzinfo=None))
    for row in locked:
        if len(taken) >= limit:
            break       # (the keys locked beyond are let go, as they were, at commit)
        window = row.period * (1 + GUARD)
        recent = sorted(s for s in json.loads(row.starts) if s > _epoch(now) - window)
        room = min(row.max_starts - len(recent), limit - len(taken))
        rows = blocked.next_of(conn, t, d, kind=blocked.RATE, key=row.key, limit=room, queues=queues) if room > 0 else []
        blocked.remove(conn, t, [x.id for x in rows])
        taken += [x.job_id for x in rows]
        recent = (recent + [_epoch(now)] * len(rows))[-row.max_starts:]
        if not blocked.waiting(conn, t, kind=blocked.RATE, key=row.key):
            opens = None
        elif len(recent) < row.max_starts:
            opens = now
        else:
            opens = _at(recent[0] + window)
        conn.execute(update(r).where(r.c.key == row.key).values(starts=json.dumps(recent), next_open=opens))
    if not taken:
        return [], now
    return _record_claims(conn, t, d, taken, process_id, now), now


def _record_claims(conn: Connection, t: Tables, d: Dialect, job_ids: list[int], process_id: int,
                   now: datetime) -> list[Claimed]:
    """The claims of ``job_ids`` (as ``claims.claim`` records them): claimed rows, deliveries, unique keys."""
    job_ids = sorted(job_ids)
    unique_keys.release(conn, t, d, job_ids=job_ids, claimed_only=True)
    conn.execute(prebuilt(t, d, "claim_insert", lambda: claim_statements.insert_claims(t, d)),
                 {"ids": job_ids, "pid": process_id, "now": now})
    rows = conn.execute(prebuilt(t, d, "claim_read", lambda: claim_statements.read_claimed(t, d)),
                        {"ids": job_ids}).all()
    return [Claimed(*row) for row in sorted(rows, key=lambda row: (-row.priority, row.id))]


def waiting_keys(conn: Connection, t: Tables, *, limit: int) -> list[Any]:
    """(key, max_starts, period, next_open) of the keys jobs wait on (``celery sqlq status``)."""
    r = t.rate_keys
    return list(conn.execute(select(r.c.key, r.c.max_starts, r.c.period, r.c.next_open)
                             .where(r.c.next_open.is_not(None)).order_by(r.c.next_open).limit(limit)).all())


