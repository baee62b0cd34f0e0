"""The process registry: workers register, heartbeat, and are pruned when they stop.

A pruner takes the claims of a dead process (``take_claims``) and hands them
to ``recover``: claims never started go back to ready (at most
``max_releases`` times), started ones fail (they may have had effects).
``dead`` locks the rows it returns (SKIP LOCKED), so only one pruner takes
each process.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Sequence

from sqlalchemy import Connection, Row, delete, false, func, insert, or_, select, update

from ..errors import MaxReleasesExceeded
from .dialects import Dialect
from . import deliveries
from .executions import make_ready
from .failed import insert_failed
from .gateway import Gateway
from .schema import Tables


@dataclass(frozen=True)
class Orphan:
    """A claim taken back from a process that is gone."""
    job_id: int
    process_id: int
    acked: bool


def register(conn: Connection, t: Tables, *, kind: str, name: str, hostname: str, pid: int,
             pool: str | None, concurrency: int | None, queues: str | None, now: datetime,
             pid_identity: str | None = None) -> int:
    """Insert a process row; returns its id (the fence every claim of this process names)."""
    return conn.execute(insert(t.processes).values(
        kind=kind, name=name, hostname=hostname, pid=pid, pid_identity=pid_identity, pool=pool,
        concurrency=concurrency,
        queues=queues, started_at=now, last_heartbeat_at=now,
    )).inserted_primary_key[0]


def heartbeat(conn: Connection, t: Tables, *, process_id: int, now: datetime) -> bool:
    """One atomic UPDATE; False means the row is gone (we were pruned)."""
    p = t.processes
    return conn.execute(update(p).where(p.c.id == process_id).values(last_heartbeat_at=now)).rowcount == 1


def set_queues(conn: Connection, t: Tables, *, process_id: int, queues: str | None) -> None:
    """Record the queues (JSON list) the process consumes from, as they change."""
    conn.execute(update(t.processes).where(t.processes.c.id == process_id).values(queues=queues))


def set_concurrency(conn: Connection, t: Tables, *, process_id: int, concurrency: int | None) -> None:
    """Record the pool size (known only after registration with ``-c auto``)."""
    conn.execute(update(t.processes).where(t.processes.c.id == process_id).values(concurrency=concurrency))


def dead(conn: Connection, t: Tables, d: Dialect, *, cutoff: datetime | None, exclude: int | None,
         ids: Sequence[int] = ()) -> list[Row]:
    """Processes whose heartbeat is older than ``cutoff`` (None: none by age), or whose id is in ``ids``
    (known to be gone, or forced out), locked (where the dialect can) so only one pruner takes each."""
    p = t.processes
    by_age = p.c.last_heartbeat_at < cutoff if cutoff is not None else false()
    q = select(p.c.id, p.c.name, p.c.hostname, p.c.pid, p.c.last_heartbeat_at).where(
        or_(by_age, p.c.id.in_(list(ids))) if ids else by_age)
    if exclude is not None:
        q = q.where(p.c.id != exclude)
    if d.skip_locked:
        q = q.with_for_update(skip_locked=True)
    return list(conn.execute(q.order_by(p.c.id)).all())


def on_host(conn: Connection, t: Tables, *, hostname: str, exclude: int | None) -> list[Row]:
    """(id, pid, pid_identity) of the processes registered from ``hostname`` with a recorded identity."""
    p = t.processes
    q = select(p.c.id, p.c.pid, p.c.pid_identity).where(p.c.hostname == hostname, p.c.pid_identity.is_not(None))
    if exclude is not None:
        q = q.where(p.c.id != exclude)
    return list(conn.execute(q).all())


def named(conn: Connection, t: Tables, *, name: str) -> list[Row]:
    """Processes whose name (``worker@host``) or id is ``name``."""
    p = t.processes
    q = select(p.c.id, p.c.name, p.c.hostname, p.c.pid, p.c.last_heartbeat_at)
    where = p.c.name == name
    if name.isdigit():
        where = or_(where, p.c.id == int(name))
    return list(conn.execute(q.where(where).order_by(p.c.id)).all())


def any_dead(conn: Connection, t: Tables, *, cutoff: datetime, exclude: int | None) -> bool:
    """A read-only look: is any process's heartbeat older than ``cutoff``? (no lock, no write)."""
    p = t.processes
    q = select(p.c.id).where(p.c.last_heartbeat_at < cutoff)
    if exclude is not None:
        q = q.where(p.c.id != exclude)
    return conn.execute(q.limit(1)).first() is not None


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


def recover(conn: Connection, t: Tables, d: Dialect, *, orphans: Sequence[Orphan], max_releases: int | None,
            error_class: str, error: str, now: datetime) -> tuple[list[int], list[int]]:
    """Release unacked orphans to ready (bounded by ``max_releases``); fail the rest.

    ``max_releases=None``: the claims are given back by their own process on its
    way out, which is no death and does not count toward the bound.
    ``error_class``: the ``errors`` class name recorded for started jobs.
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
    deliveries.ended(conn, t, [o.job_id for o in orphans], released=released if max_releases is not None else ())
    if released:
        make_ready(conn, t, d, released, now)
    over_limit = [o.job_id for o in orphans if not o.acked and o.job_id not in releasable]
    started = [o.job_id for o in orphans if o.acked]
    if started:
        insert_failed(conn, t, started, error_class, error, now)
    if over_limit:
        insert_failed(conn, t, over_limit, MaxReleasesExceeded.__name__,
                      f"released {max_releases} times after its worker died; {error}", now)
    return released, failed


def listing(conn: Connection, t: Tables, *, held_limit: int) -> list[dict[str, Any]]:
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


class Processes(Gateway):
    """``store.processes``: the registry, each statement in its own transaction.

    Pruning composes ``dead``, ``take_claims``, ``recover`` and ``delete_process``
    in one transaction: call those functions inside ``store.run``.
    """

    __slots__ = ()

    def register(self, *, kind: str, name: str, hostname: str, pid: int, pool: str | None,
                 concurrency: int | None, queues: str | None, now: datetime, pid_identity: str | None = None) -> int:
        return self.store.run(register, self.t, kind=kind, name=name, hostname=hostname, pid=pid, pool=pool,
                              concurrency=concurrency, queues=queues, now=now, pid_identity=pid_identity)

    def heartbeat(self, *, process_id: int, now: datetime) -> bool:
        """One statement, on the calling thread's own connection where that saves round trips."""
        return self.store.run(heartbeat, self.t, process_id=process_id, now=now, single=True)

    def set_queues(self, *, process_id: int, queues: str | None) -> None:
        self.store.run(set_queues, self.t, process_id=process_id, queues=queues)

    def set_concurrency(self, *, process_id: int, concurrency: int | None) -> None:
        self.store.run(set_concurrency, self.t, process_id=process_id, concurrency=concurrency)

    def on_host(self, *, hostname: str, exclude: int | None) -> list[Row]:
        return self.store.read(on_host, self.t, hostname=hostname, exclude=exclude)

    def named(self, name: str) -> list[Row]:
        return self.store.read(named, self.t, name=name)

    def any_dead(self, *, cutoff: datetime, exclude: int | None) -> bool:
        return self.store.read(any_dead, self.t, cutoff=cutoff, exclude=exclude)

    def delete(self, process_id: int) -> bool:
        return self.store.run(delete_process, self.t, process_id=process_id)

    def listing(self, *, held_limit: int) -> list[dict[str, Any]]:
        return self.store.read(listing, self.t, held_limit=held_limit)
