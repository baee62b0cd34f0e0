"""Reads the dashboard needs and no other part of the package does.

Why a module of its own: the web pages must stay fast on a store holding a
million finished jobs, so every read here is *bounded* — a keyset page, a
window of job ids, a count capped at ``cap + 1`` rows, a group over the latest
``sample`` failures — and says when it stopped early, so that the page can say
so instead of pretending to an exact answer.  Writes (retry, discard, pause,
prune) never live here; they go through :mod:`celery_sqlbackend.admin`.

Statement functions take an open connection and the store's tables, like the
store's other modules; :class:`DashboardReads` runs each in the store's
read-only, retried transaction.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Sequence

from sqlalchemy import Connection, func, select, text

from .schema import Tables

#: The states a job can be listed by (``None``: any).
STATES = ("ready", "scheduled", "claimed", "failed", "finished")


@dataclass(frozen=True)
class JobFilter:
    """What the Jobs page filters by; the scan filters (task, text, times) need a bounded id window."""
    state: str | None = None
    queue: str | None = None
    task: str | None = None           # substring of the task name
    text: str | None = None           # substring of the stored message (argsrepr, kwargsrepr, headers)
    created_from: datetime | None = None
    created_to: datetime | None = None

    def __post_init__(self) -> None:
        if self.state is not None and self.state not in STATES:
            raise ValueError(f"unknown job state {self.state!r}; known: {', '.join(STATES)}")

    @property
    def scans(self) -> bool:
        """True when a filter has no index behind it, so the read must walk a bounded id window."""
        return bool(self.queue or self.task or self.text or self.created_from or self.created_to)


@dataclass(frozen=True)
class JobRow:
    id: int
    queue: str
    task_name: str | None
    task_id: str | None
    created_at: datetime
    finished_at: datetime | None
    args: str                        # argsrepr/kwargsrepr from the message headers (may be truncated)
    state: str = "?"


@dataclass
class JobPage:
    rows: list[JobRow]
    #: The next page starts below this id (None: nothing older).
    next_before: int | None
    #: The id range actually searched ([scanned_low, scanned_high)); the page says so when it stopped early.
    scanned_low: int | None = None
    scanned_high: int | None = None
    stopped_early: bool = False


@dataclass(frozen=True)
class Count:
    """A count that may be capped: ``n`` is exact when ``capped`` is False, else "more than cap".

    ``within``: counted among only the latest ``within`` rows (a filter with no index behind it).
    """
    n: int
    capped: bool
    within: int | None = None

    @property
    def exact(self) -> bool:
        return not self.capped and self.within is None

    def __str__(self) -> str:
        text = f"{self.n:,}+" if self.capped else f"{self.n:,}"
        return f"{text} of the latest {self.within:,}" if self.within is not None else text


@dataclass(frozen=True)
class FailedRow:
    job_id: int
    task_id: str | None
    task_name: str | None
    queue: str
    error_class: str
    error: str
    failed_at: datetime


@dataclass
class FailedSummary:
    by_error: list[tuple[str, int]]                  # exact, every failure
    groups: list[tuple[str, str | None, int]]        # (error class, task, n) over the latest ``sample``
    sample: int
    sampled: bool                                    # True when there are more failures than ``sample``


@dataclass(frozen=True)
class ScheduledRow:
    job_id: int
    queue: str
    task_name: str | None
    task_id: str | None
    scheduled_at: datetime


@dataclass
class Throughput:
    """Jobs finished per queue per minute, oldest minute first."""
    minutes: list[datetime]
    by_queue: dict[str, list[int]] = field(default_factory=dict)
    #: True when more than the cap finished in the window: earlier minutes may be undercounted.
    capped: bool = False


# --------------------------------------------------------------------------- helpers

def _capped_count(conn: Connection, inner, cap: int) -> Count:
    n = conn.execute(select(func.count()).select_from(inner.limit(cap + 1).subquery())).scalar_one()
    return Count(min(n, cap), n > cap)


def _args_of(payload: str, width: int = 160) -> str:
    """The argument text Celery put in the headers (``argsrepr``, ``kwargsrepr``), shortened."""
    try:
        headers = json.loads(payload).get("headers") or {}
    except (ValueError, TypeError, AttributeError):
        return payload[:width]
    args, kwargs = headers.get("argsrepr"), headers.get("kwargsrepr")
    out = f"{args if args is not None else ''}" + (f" {kwargs}" if kwargs not in (None, "{}", "") else "")
    return out if len(out) <= width else out[:width - 1] + "…"


def _minute(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value.replace(second=0, microsecond=0)
    return datetime.strptime(str(value)[:16], "%Y-%m-%d %H:%M")


def _minute_bucket(col, dialect_name: str):
    if dialect_name == "postgresql":
        return func.date_trunc("minute", col)
    if dialect_name in ("mysql", "mariadb"):
        return func.date_format(col, "%Y-%m-%d %H:%i")
    return func.strftime("%Y-%m-%d %H:%M", col)


# --------------------------------------------------------------------------- jobs

def _job_select(t: Tables, flt: JobFilter):
    j = t.jobs
    execution = {"ready": t.ready, "scheduled": t.scheduled, "claimed": t.claimed, "failed": t.failed}.get(
        flt.state or "")
    q = select(j.c.id, j.c.queue_name, j.c.task_name, j.c.task_id, j.c.created_at, j.c.finished_at, j.c.payload)
    if execution is not None:
        # Driven from the (small) execution table, newest job first along its unique job_id index.
        q = q.select_from(execution.join(j, j.c.id == execution.c.job_id))
        key = execution.c.job_id
    else:
        key = j.c.id
        if flt.state == "finished":
            q = q.where(j.c.finished_at.is_not(None))
    if flt.queue:
        q = q.where(j.c.queue_name == flt.queue)
    if flt.task:
        q = q.where(j.c.task_name.contains(flt.task, autoescape=True))
    if flt.text:
        q = q.where(j.c.payload.contains(flt.text, autoescape=True))
    if flt.created_from:
        q = q.where(j.c.created_at >= flt.created_from)
    if flt.created_to:
        q = q.where(j.c.created_at < flt.created_to)
    return q, key


def jobs_in_window(conn: Connection, t: Tables, *, flt: JobFilter, before: int | None, low: int | None,
                   limit: int) -> list[JobRow]:
    """Jobs matching ``flt`` with ``low <= id < before``, newest first, at most ``limit``."""
    q, key = _job_select(t, flt)
    if before is not None:
        q = q.where(key < before)
    if low is not None:
        q = q.where(key >= low)
    rows = conn.execute(q.order_by(key.desc()).limit(limit)).all()
    return [JobRow(r.id, r.queue_name, r.task_name, r.task_id, r.created_at, r.finished_at, _args_of(r.payload),
                   flt.state or "?") for r in rows]


def job_id_bounds(conn: Connection, t: Tables) -> tuple[int | None, int | None]:
    """The lowest and highest job id (two primary-key lookups)."""
    j = t.jobs
    return (conn.execute(select(func.min(j.c.id))).scalar(), conn.execute(select(func.max(j.c.id))).scalar())


def states_of(conn: Connection, t: Tables, *, job_ids: Sequence[int]) -> dict[int, str]:
    """The state of each job (a job with no execution row and a finish time is finished)."""
    if not job_ids:
        return {}
    out: dict[int, str] = {}
    for table, state in ((t.ready, "ready"), (t.scheduled, "scheduled"), (t.claimed, "claimed"),
                         (t.failed, "failed")):
        for job_id in conn.execute(select(table.c.job_id).where(table.c.job_id.in_(list(job_ids)))).scalars():
            out[job_id] = state
    j = t.jobs
    for job_id, finished in conn.execute(select(j.c.id, j.c.finished_at).where(j.c.id.in_(list(job_ids)))):
        out.setdefault(job_id, "finished" if finished is not None else "unknown")
    return out


def state_counts(conn: Connection, t: Tables, *, cap: int) -> dict[str, Count]:
    """How many jobs are in each state, each count stopped at ``cap``."""
    out = {}
    for table, state in ((t.ready, "ready"), (t.scheduled, "scheduled"), (t.claimed, "claimed"),
                         (t.failed, "failed")):
        out[state] = _capped_count(conn, select(table.c.job_id), cap)
    j = t.jobs
    out["finished"] = _capped_count(conn, select(j.c.id).where(j.c.finished_at.is_not(None)), cap)
    return out


def table_estimate(conn: Connection, t: Tables, dialect_name: str) -> int | None:
    """The planner's row estimate for ``jobs`` on PostgreSQL (free; None elsewhere)."""
    if dialect_name != "postgresql":
        return None
    n = conn.execute(text("SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(:name)"),
                     {"name": t.jobs.name}).scalar()
    return int(n) if n is not None and n >= 0 else None


def job_holder(conn: Connection, t: Tables, *, job_id: int) -> dict | None:
    """The process holding ``job_id`` now (claim and process row), if any."""
    c, p = t.claimed, t.processes
    row = conn.execute(
        select(c.c.process_id, c.c.claimed_at, c.c.acked_at, p.c.name, p.c.hostname, p.c.pid,
               p.c.last_heartbeat_at)
        .select_from(c.outerjoin(p, p.c.id == c.c.process_id)).where(c.c.job_id == job_id)).first()
    return dict(row._mapping) if row is not None else None


def job_result(conn: Connection, t: Tables, *, task_id: str) -> dict | None:
    """The result backend's row for ``task_id`` (status, worker, when), payload still encoded."""
    r = t.results
    row = conn.execute(select(r.c.status, r.c.worker, r.c.date_done, r.c.retries, r.c.content_type,
                              r.c.content_encoding, r.c.payload).where(r.c.task_id == task_id)).first()
    return dict(row._mapping) if row is not None else None


# --------------------------------------------------------------------------- failed

def _failed_select(t: Tables, *, queue: str | None, task_name: str | None, error_class: str | None,
                   join: bool = True):
    f, j = t.failed, t.jobs
    q = select(f.c.job_id).select_from(f.join(j, j.c.id == f.c.job_id) if join or task_name else f)
    if queue:
        q = q.where(f.c.queue_name == queue)
    if task_name:
        q = q.where(j.c.task_name == task_name)
    if error_class:
        q = q.where(f.c.error_class == error_class)
    return q


def failed_page(conn: Connection, t: Tables, *, queue: str | None = None, task_name: str | None = None,
                error_class: str | None = None, before: int | None = None, limit: int = 50) -> list[FailedRow]:
    """Failed jobs matching the filters, newest job first, keyset-paged below ``before``."""
    f, j = t.failed, t.jobs
    q = _failed_select(t, queue=queue, task_name=task_name, error_class=error_class).with_only_columns(
        f.c.job_id, j.c.task_id, j.c.task_name, f.c.queue_name, f.c.error_class, f.c.error, f.c.failed_at)
    if before is not None:
        q = q.where(f.c.job_id < before)
    return [FailedRow(*r) for r in conn.execute(q.order_by(f.c.job_id.desc()).limit(limit))]


def failed_count(conn: Connection, t: Tables, *, queue: str | None = None, task_name: str | None = None,
                 error_class: str | None = None, cap: int, sample: int) -> Count:
    """Failed jobs matching, stopped at ``cap``.

    The task name lives in ``jobs``: counting by it joins every failure to a
    million-row table, so it is counted among the latest ``sample`` failures only.
    """
    if not task_name:
        return _capped_count(conn, _failed_select(t, queue=queue, task_name=None, error_class=error_class,
                                                  join=False), cap)
    f, j = t.failed, t.jobs
    latest = select(f.c.job_id, f.c.queue_name, f.c.error_class).order_by(f.c.id.desc()).limit(sample).subquery()
    q = (select(func.count()).select_from(latest.join(j, j.c.id == latest.c.job_id))
         .where(j.c.task_name == task_name))
    if queue:
        q = q.where(latest.c.queue_name == queue)
    if error_class:
        q = q.where(latest.c.error_class == error_class)
    n = conn.execute(q).scalar_one()
    total = conn.execute(select(func.count()).select_from(
        select(f.c.id).limit(sample + 1).subquery())).scalar_one()
    return Count(n, False, sample if total > sample else None)


def failed_summary(conn: Connection, t: Tables, *, sample: int) -> FailedSummary:
    """Failures per error class (exact: one table, no join) and per (error class, task) over the latest ``sample``."""
    f, j = t.failed, t.jobs
    by_error = [(e, n) for e, n in conn.execute(
        select(f.c.error_class, func.count()).group_by(f.c.error_class).order_by(func.count().desc()))]
    latest = select(f.c.job_id, f.c.error_class).order_by(f.c.id.desc()).limit(sample).subquery()
    groups = [(e, task, n) for e, task, n in conn.execute(
        select(latest.c.error_class, j.c.task_name, func.count())
        .select_from(latest.join(j, j.c.id == latest.c.job_id))
        .group_by(latest.c.error_class, j.c.task_name).order_by(func.count().desc()))]
    return FailedSummary(by_error, groups, sample, sum(n for _, n in by_error) > sample)


# --------------------------------------------------------------------------- scheduled, throughput

def scheduled_page(conn: Connection, t: Tables, *, queue: str | None = None,
                   after: tuple[datetime, int] | None = None, limit: int = 50) -> list[ScheduledRow]:
    """Scheduled (ETA) jobs, soonest first, keyset-paged after ``(scheduled_at, job_id)``."""
    s, j = t.scheduled, t.jobs
    q = (select(s.c.job_id, s.c.queue_name, j.c.task_name, j.c.task_id, s.c.scheduled_at)
         .select_from(s.join(j, j.c.id == s.c.job_id)))
    if queue:
        q = q.where(s.c.queue_name == queue)
    if after is not None:
        at, job_id = after
        q = q.where((s.c.scheduled_at > at) | ((s.c.scheduled_at == at) & (s.c.job_id > job_id)))
    return [ScheduledRow(*r) for r in conn.execute(q.order_by(s.c.scheduled_at, s.c.job_id).limit(limit))]


def throughput(conn: Connection, t: Tables, dialect_name: str, *, now: datetime, minutes: int,
               cap: int) -> Throughput:
    """Finished jobs per queue per minute over the last ``minutes`` (at most ``cap`` rows read)."""
    j = t.jobs
    start = now.replace(second=0, microsecond=0) - timedelta(minutes=minutes - 1)
    recent = (select(j.c.queue_name, j.c.finished_at).where(j.c.finished_at >= start)
              .order_by(j.c.finished_at.desc()).limit(cap).subquery())
    bucket = _minute_bucket(recent.c.finished_at, dialect_name).label("minute")
    rows = conn.execute(select(recent.c.queue_name, bucket, func.count()).group_by(recent.c.queue_name, bucket)).all()
    axis = [start + timedelta(minutes=i) for i in range(minutes)]
    index = {m: i for i, m in enumerate(axis)}
    out = Throughput(axis, capped=sum(n for *_, n in rows) >= cap)
    for queue, minute, n in rows:
        i = index.get(_minute(minute))
        if i is not None:
            out.by_queue.setdefault(queue, [0] * minutes)[i] += n
    return out


def finished_since(conn: Connection, t: Tables, *, since: datetime) -> dict[str, int]:
    """Jobs finished per queue since ``since`` (a range of the (queue, finished_at) index per queue)."""
    j = t.jobs
    return dict(conn.execute(select(j.c.queue_name, func.count()).where(j.c.finished_at >= since)
                             .group_by(j.c.queue_name)).all())


def failed_since(conn: Connection, t: Tables, *, since: datetime) -> dict[str, int]:
    f = t.failed
    return dict(conn.execute(select(f.c.queue_name, func.count()).where(f.c.failed_at >= since)
                             .group_by(f.c.queue_name)).all())


# --------------------------------------------------------------------------- iterative jobs

@dataclass(frozen=True)
class IterativeRow:
    task_id: str
    task_name: str | None
    state: str
    iterations: int
    total: int | None
    cursor: str | None
    seconds: float                  # time spent iterating over all runs
    times_interrupted: int
    error: str | None
    started_at: datetime | None
    updated_at: datetime

    @property
    def rate(self) -> float | None:
        """Items per second of iterating (None before the first checkpoint with time in it)."""
        return self.iterations / self.seconds if self.seconds > 0 else None

    @property
    def eta(self) -> float | None:
        """Seconds of iterating left, when the enumerator told its size."""
        if self.total is None or not self.rate:
            return None
        return max(0, self.total - self.iterations) / self.rate

    @property
    def percent(self) -> float | None:
        return min(100.0, 100.0 * self.iterations / self.total) if self.total else None


def iterative_jobs(conn: Connection, t: Tables, *, states: Sequence[str] | None, limit: int) -> list[IterativeRow]:
    """Iterative jobs' durable checkpoints (checkpoint's table), most recently updated first."""
    c = t.checkpoints
    q = select(c.c.task_id, c.c.task_name, c.c.state, c.c.iterations, c.c.total, c.c.cursor, c.c.counters,
               c.c.error, c.c.started_at, c.c.updated_at)
    if states:
        q = q.where(c.c.state.in_(list(states)))
    out = []
    for r in conn.execute(q.order_by(c.c.updated_at.desc()).limit(limit)):
        try:
            counters = json.loads(r.counters or "{}")
        except ValueError:
            counters = {}
        seconds = float(counters.get("total_time") or 0.0)
        if not seconds and r.started_at is not None:
            # A first run adds its time to total_time only when it stops: until then, its age.
            seconds = max(0.0, (r.updated_at - r.started_at).total_seconds())
        out.append(IterativeRow(r.task_id, r.task_name, r.state, int(r.iterations or 0), r.total, r.cursor,
                                seconds, int(counters.get("times_interrupted") or 0),
                                r.error, r.started_at, r.updated_at))
    return out


# --------------------------------------------------------------------------- the gateway

class DashboardReads:
    """The reads above, each run in the store's read-only, retried transaction."""

    def __init__(self, store) -> None:
        self.store = store

    def _read(self, fn, **kwargs):
        return self.store.read(fn, self.store.t, **kwargs)

    @property
    def dialect_name(self) -> str:
        return self.store.dialect.name

    def jobs_in_window(self, flt: JobFilter, before: int | None, low: int | None, limit: int) -> list[JobRow]:
        return self._read(jobs_in_window, flt=flt, before=before, low=low, limit=limit)

    def job_id_bounds(self) -> tuple[int | None, int | None]:
        return self._read(job_id_bounds)

    def states_of(self, job_ids: Sequence[int]) -> dict[int, str]:
        return self._read(states_of, job_ids=job_ids)

    def state_counts(self, cap: int) -> dict[str, Count]:
        return self._read(state_counts, cap=cap)

    def table_estimate(self) -> int | None:
        return self.store.read(table_estimate, self.store.t, self.dialect_name)

    def job_holder(self, job_id: int) -> dict | None:
        return self._read(job_holder, job_id=job_id)

    def job_result(self, task_id: str) -> dict | None:
        return self._read(job_result, task_id=task_id)

    def failed_page(self, before: int | None, limit: int, **filters: str | None) -> list[FailedRow]:
        return self._read(failed_page, before=before, limit=limit, **filters)

    def failed_count(self, cap: int, sample: int, **filters: str | None) -> Count:
        return self._read(failed_count, cap=cap, sample=sample, **filters)

    def failed_summary(self, sample: int) -> FailedSummary:
        return self._read(failed_summary, sample=sample)

    def scheduled_page(self, queue: str | None, after: tuple[datetime, int] | None, limit: int) -> list[ScheduledRow]:
        return self._read(scheduled_page, queue=queue, after=after, limit=limit)

    def throughput(self, now: datetime, minutes: int, cap: int) -> Throughput:
        return self.store.read(throughput, self.store.t, self.dialect_name, now=now, minutes=minutes, cap=cap)

    def finished_since(self, since: datetime) -> dict[str, int]:
        return self._read(finished_since, since=since)

    def failed_since(self, since: datetime) -> dict[str, int]:
        return self._read(failed_since, since=since)

    def has_checkpoints(self) -> bool:
        """Whether checkpoint's table exists here (the Iterative jobs page is shown only then)."""
        from sqlalchemy import inspect
        t = self.store.t
        return hasattr(t, "checkpoints") and inspect(self.store.engine).has_table(t.checkpoints.name)

    def iterative_jobs(self, states: Sequence[str] | None, limit: int) -> list[IterativeRow]:
        return self._read(iterative_jobs, states=states, limit=limit)
