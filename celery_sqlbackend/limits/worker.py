"""The worker's side of limits: giving slots back, claiming rate-blocked jobs, the chores.

Why in the worker and apart from the claim and finish statements: jobs
without limits must cost nothing more (issue #17).  So the worker notes the
deliveries that hold a ``Concurrency`` slot (``delivered``: their message says
so), and only when one of *those* finishes does it give the slot back
(``finished``: one more short transaction, which lets the next blocked job
of the key in).  Whatever escapes that path (the process died between finish
and release, a pruner or an operator failed the job, the slot's ``duration``
ran out) is caught by ``chores``, run with the promotion of due jobs (every
``dispatch_interval``) and after each heartbeat's pruning.

Rate-blocked jobs are claimed by their own statement (``store.limits.claim_rated``), and
only once a key can have opened (``RateGate``): while no job waits on a rate
the claim loop sends nothing more.  Both sides skip everything while the
database has no limited jobs at all (``active``, looked up every ``RECHECK`` s).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Mapping, Sequence

from sqlalchemy.exc import SQLAlchemyError

from ..store import Store, utcnow
from ..store.claims import Claimed
from .keys import counts_rate, holds_slot

log = logging.getLogger("celery_sqlbackend.limits")

#: How often a process checks whether the database has limited jobs at all (seconds): the longest
#: the first rate-limited job of an idle database waits for a look.
RECHECK = 5.0
#: After a rate claim found nothing for this process's queues, the next look waits this long (seconds).
LOOK_AFTER_EMPTY = 1.0
#: Rows per chore batch.
BATCH = 500
#: Semaphore rows of keys nobody held or waited on for this long are deleted.
IDLE_KEYS_AFTER = timedelta(hours=1)


@dataclass
class _State:
    """One process's limit bookkeeping for one store."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    holding: set[int] = field(default_factory=set)     # delivered jobs that hold a Concurrency slot
    active_until: float = 0.0                           # monotonic: ``active`` is known until then
    active: bool = False
    #: Per set of queues claimed from: (the soonest a rate key opens, as last looked; the monotonic
    #: time from which to look again).  Per set, so that a claim of other queues (remote control's)
    #: that finds nothing does not hold back the claims of the task queues.
    gates: dict[tuple[str, ...], tuple[datetime | None, float]] = field(default_factory=dict)
    #: Rate-claimed jobs not yet delivered -> the time (epoch) their start was counted at.
    claimed_at: dict[int, float] = field(default_factory=dict)


_STATES: dict[int, _State] = {}
_STATES_LOCK = threading.Lock()


def _epoch(at: datetime) -> float:
    return at.replace(tzinfo=timezone.utc).timestamp()


def _state(store: Store) -> _State:
    with _STATES_LOCK:
        return _STATES.setdefault(id(store), _State())


def active(store: Store) -> bool:
    """Whether the database has limit keys at all (cached for ``RECHECK`` seconds)."""
    st = _state(store)
    now = time.monotonic()
    if now >= st.active_until:
        st.active = store.limits.in_use()
        st.active_until = now + RECHECK
    return st.active or bool(st.holding)


def delivered(store: Store, job_id: int, payload: Mapping[str, Any]) -> None:
    """A job was delivered to this process: note it if it holds a slot (its finish gives it back).

    A rate-limited job's delivery says when its start was counted (``delivery_info["sqlq_claimed_at"]``,
    epoch seconds, the claim's time; a task sees it in ``self.request.properties``).
    """
    st = _state(store)
    if st.claimed_at and counts_rate(payload):
        with st.lock:
            at = st.claimed_at.pop(job_id, None)
        if at is not None:
            payload["properties"]["delivery_info"]["sqlq_claimed_at"] = at
    if holds_slot(payload):
        with st.lock:
            st.holding.add(job_id)
            st.active = True


def finished(store: Store, job_ids: Iterable[int]) -> None:
    """Jobs finished here: give back the slots those of them hold, letting the next blocked jobs in."""
    st = _state(store)
    if not st.holding:
        return
    with st.lock:
        mine = st.holding.intersection(job_ids)
        st.holding.difference_update(mine)
    if not mine:
        return
    try:
        store.limits.release(job_ids=sorted(mine), now=utcnow())
    except SQLAlchemyError as exc:
        log.warning("could not give back the concurrency slots of job(s) %s (%s); the next chores will",
                    sorted(mine), exc)


def claim_throttled(store: Store, queues: Sequence[str], limit: int, process_id: int) -> list[Claimed]:
    """Rate-blocked jobs of ``queues`` this process may start now (none while no key is open)."""
    if limit <= 0 or not active(store):
        return []
    gates, gate = _state(store).gates, tuple(queues)
    opens_at, next_look = gates.get(gate, (None, 0.0))
    now, mono = utcnow(), time.monotonic()
    if opens_at is None or opens_at > now:
        # Not known to be open: one index read (``next_open``) at most every polling interval.
        if mono < next_look:
            return []
        opens_at = store.limits.next_open()
        gates[gate] = (opens_at, mono + store.options.polling_interval)
        if opens_at is None or opens_at > now:
            return []
    claimed, at = store.limits.claim_rated(queues=queues, limit=limit, process_id=process_id, now=now)
    if claimed:
        st = _state(store)
        with st.lock:
            st.claimed_at.update(dict.fromkeys((job.job_id for job in claimed), _epoch(at)))
    # Look again next round; after an empty claim (open keys, but in other queues) not for a while.
    gates[gate] = (None, mono if claimed else mono + LOOK_AFTER_EMPTY)
    return claimed


def chores(store: Store) -> int:
    """Give back the slots whose release never came or whose ``duration`` ran out; let blocked jobs in
    where a key has room (a limit raised in code, holds gone).  Returns the jobs let in."""
    if not active(store):
        return 0
    sem, now = store.limits, utcnow()
    let_in = 0
    stale = sem.orphaned(limit=BATCH)
    if stale:
        let_in += len(sem.release(job_ids=stale, now=now))
    expired = sem.expired(now=now, limit=BATCH)
    if expired:
        log.warning("concurrency slots of job(s) %s outlived their duration: given back", expired[:20])
        let_in += len(sem.release(job_ids=expired, now=now))
    for key in sem.starved_keys(now=now, limit=BATCH):
        let_in += len(sem.let_in(key=key, now=now))
    if sem.has_due(now=now):    # scheduled jobs with limits whose ETA came
        while (n := sem.dispatch_due(now=now, limit=BATCH)):
            let_in += n
            if n < BATCH:
                break
    return let_in


def forget_idle(store: Store) -> None:
    """Delete semaphore rows nobody has used for ``IDLE_KEYS_AFTER`` (run with the clearing of history)."""
    if active(store):
        store.limits.forget_idle(before=utcnow() - IDLE_KEYS_AFTER, limit=BATCH)
