"""Where the last claim of a queue stopped in the poll index, so that the next one starts there (PostgreSQL).

Why: a claim walks ``ix_*ready_poll`` (queue, priority DESC, job_id) from its
start.  Every ready row a claim takes is deleted, and while some transaction
holds an old snapshot (an idle-in-transaction session, a long report, a
replica's ``hot_standby_feedback``) neither VACUUM nor the walk itself can
remove those index entries: each one still points at a row version that
snapshot may see.  So the walk grows by one entry per job that has flowed
since the snapshot began, and after 100,000 jobs a claim reads 24 times the
pages it read on a fresh table (``bench/README.md``).  Claimed jobs are at the
front of the index: a claim that starts where the last one stopped never
reads them.

How: one queue's claim takes, in index order, from three ranges, each a
locking read (``FOR UPDATE SKIP LOCKED``) that PostgreSQL runs only while the
claim still wants rows:

* priorities above the resume point (jobs enqueued since with a higher priority);
* the resume point's priority, job ids after it (where the last claim stopped);
* lower priorities, from their start.

What a resume point can miss is a job that became ready *behind* it: a job
released or promoted (an ETA come due, a limit let go), whose id is old, or
one committed after a job with a higher id was already claimed (a long
``enqueue_in`` transaction).  So a claim walks from the start of the index
again, as before, whenever this process made an old job ready
(``note_made_ready``, from ``executions.make_ready``), and in any case once
``REWALK_EVERY`` seconds have passed, or twenty times as long as the last
walk from the start took, whichever is longer: at most 5% of the time goes
to walks from the start, however long a snapshot is held, and a job behind
the point waits at most that long.  FIFO holds as before except for those
jobs.

Scope: PostgreSQL (data-modifying CTEs), a claim from one queue.  A claim
from several queues sorts the ready rows of all of them and walks from the
start, as before.  SQLite has no snapshots held by other sessions across
writes; MariaDB's claim is its own packet (``claim_packet``).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from sqlalchemy import Integer, Select, bindparam, exists, select, union_all

from .dialects import Dialect
from .schema import Tables

if TYPE_CHECKING:
    from .claims import Claimed

#: A claim walks the poll index from its start at least this often (seconds).
REWALK_EVERY = 0.2

#: ... and no more than once per this many times the last such walk took.
REWALK_COST_SHARE = 20


@dataclass(frozen=True)
class Walk:
    """One claim's start: ``after`` (priority, job id) in the index, or None for its start."""
    after: tuple[int, int] | None
    made_ready: int          # ``Tables.made_ready`` when the claim began
    started: float


class ResumePoint:
    """The resume point of one queue's claims in one process (module doc)."""

    def __init__(self) -> None:
        self._after: tuple[int, int] | None = None
        self._made_ready = -1        # ``Tables.made_ready`` at the last walk from the start
        self._walked_at = 0.0        # when it began (monotonic)
        self._walk_took = 0.0
        self._lock = threading.Lock()

    @property
    def after(self) -> tuple[int, int] | None:
        """(priority, job id) of the last job claimed, where a resumed claim starts; None before any."""
        return self._after

    def begin(self, t: Tables) -> Walk:
        """Where the next claim starts."""
        now = time.monotonic()
        with self._lock:
            due = max(REWALK_EVERY, REWALK_COST_SHARE * self._walk_took)
            fresh = self._made_ready == t.made_ready and now - self._walked_at < due
            return Walk(self._after if fresh else None, t.made_ready, now)

    def end(self, walk: Walk, claimed: Sequence["Claimed"]) -> None:
        """The claim that began with ``walk`` took ``claimed`` (best first).  Called before its commit,
        which may yet fail: jobs passed that way wait for the next walk from the start."""
        with self._lock:
            if walk.after is None:
                self._made_ready, self._walked_at = walk.made_ready, walk.started
                self._walk_took = time.monotonic() - walk.started
            if claimed:
                last = claimed[-1]
                self._after = (last.priority, last.job_id)


def note_made_ready(t: Tables) -> None:
    """An old job became ready (released, promoted, let in by a limit): the next claims walk from the start."""
    t.made_ready += 1


def params(walk: Walk, queue: str) -> dict:
    """The bind values of a claim of ``queue`` resumed at ``walk.after``."""
    priority, job_id = walk.after
    return {"queue": queue, "after_priority": priority, "after_job": job_id}


def candidates(t: Tables, d: Dialect, owner) -> Select:
    """The ready rows' ids a resumed claim of ``:queue`` takes, best first (module doc); nothing unless
    ``owner`` (the fence on the process row) has a row, and nothing from a paused queue."""
    r = t.ready
    limit = bindparam("limit", type_=Integer(), literal_execute=d.server_prepared)
    allowed = (r.c.queue_name == bindparam("queue"), exists(select(owner.c.id)),
               ~exists(select(t.pauses.c.queue_name).where(t.pauses.c.queue_name == bindparam("queue"))))
    at = bindparam("after_priority", type_=Integer())

    def part(name: str, *where, order) -> Select:
        rows = (select(r.c.id).where(*allowed, *where).order_by(*order).limit(limit)
                .with_for_update(skip_locked=True).subquery(name))
        return select(rows.c.id)

    above = part("above", r.c.priority > at, order=(r.c.priority.desc(), r.c.job_id))
    after = part("after", r.c.priority == at, r.c.job_id > bindparam("after_job", type_=Integer()),
                 order=(r.c.job_id,))
    below = part("below", r.c.priority < at, order=(r.c.priority.desc(), r.c.job_id))
    parts = union_all(above, after, below).subquery("parts")
    return select(parts.c.id).limit(limit)
