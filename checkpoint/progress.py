"""Reading iterative jobs' progress, for ``celery sqlq status`` and dashboards.

Every iterative job with a durable store has one row in
``<prefix>checkpoints`` (see :mod:`checkpoint.store`): written when a run
starts, at each checkpoint, when it is interrupted, retried, fails, is
revoked or completes.  This module only reads it::

    from checkpoint.progress import list_progress
    for p in list_progress("postgresql+psycopg://…", states=["running", "interrupted"]):
        print(p.task_name, p.state, p.iterations, p.total, p.fraction)

A running job's figures are as fresh as its last checkpoint
(``checkpoint_every`` items or ``checkpoint_interval`` seconds).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Optional, Union

import sqlalchemy as sa

from celery_sqlbackend.store import pooler, pymysql_tls
from celery_sqlbackend.store.schema import DEFAULT_PREFIX, tables
from celery_sqlbackend.urls import database_url

__all__ = ["JobProgress", "list_progress", "STATES"]

#: The states a row can be in.  ``retrying``: a Celery retry is queued;
#: ``interrupted``: re-enqueued after a stop (shutdown, max_job_runtime, throttle).
STATES = ("running", "interrupted", "retrying", "done", "failed", "revoked")


@dataclass(frozen=True)
class JobProgress:
    """One iterative job, as its last checkpoint left it (times are naive UTC)."""

    task_id: str
    task_name: Optional[str]
    state: str
    #: Items processed over all runs (batches, for batch enumerators).
    iterations: int
    #: Items the whole job takes, when the enumerator could tell (ranges, sequences, row counts).
    total: Optional[int]
    #: Share done, 0..1, when known (iterations/total, or bytes read/file size for CSV).
    fraction: Optional[float]
    times_interrupted: int
    #: Seconds spent iterating over all runs.
    total_time: float
    cursor: Any
    #: ``ExceptionClass: message`` of the last failure, if the job failed.
    error: Optional[str]
    started_at: Optional[datetime]
    updated_at: datetime
    finished_at: Optional[datetime]


def _engine(url_or_engine: Union[str, sa.Engine]) -> tuple[sa.Engine, bool]:
    if isinstance(url_or_engine, sa.Engine):
        return url_or_engine, False
    url, extra = pooler.engine_arguments(database_url(url_or_engine))   # (a pooler in transaction mode: no prepared statements)
    return pymysql_tls.install(sa.create_engine(url, poolclass=sa.pool.NullPool, **extra)), True


def list_progress(url_or_engine: Union[str, sa.Engine], *, states: Optional[Iterable[str]] = None,
                  task_name: Optional[str] = None, task_ids: Optional[Iterable[str]] = None,
                  limit: int = 100, table_prefix: str = DEFAULT_PREFIX) -> list[JobProgress]:
    """Iterative jobs, most recently updated first.

    ``url_or_engine`` is a SQLAlchemy URL (an ``sqlq+`` broker URL is fine)
    or an Engine.  An empty list when the table does not exist yet.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit!r}")
    states = list(states) if states is not None else None
    unknown = sorted(set(states or ()) - set(STATES))
    if unknown:
        raise ValueError(f"unknown checkpoint states {unknown}; use some of {list(STATES)}")
    t = tables(table_prefix).checkpoints
    query = sa.select(t).order_by(t.c.updated_at.desc(), t.c.task_id).limit(limit)
    if states is not None:
        query = query.where(t.c.state.in_(states))
    if task_name is not None:
        query = query.where(t.c.task_name == task_name)
    if task_ids is not None:
        query = query.where(t.c.task_id.in_(list(task_ids)))
    engine, owned = _engine(url_or_engine)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table(t.name):
                return []
            rows = list(conn.execute(query).mappings())
    finally:
        if owned:
            engine.dispose()
    return [_to_progress(r) for r in rows]


def _to_progress(row: Any) -> JobProgress:
    try:
        counters = json.loads(row["counters"] or "{}")
    except ValueError:
        counters = {}
    try:
        cursor = json.loads(row["cursor"]) if row["cursor"] is not None else None
    except ValueError:
        cursor = row["cursor"]
    iterations = max(int(row["iterations"] or 0), int(counters.get("iterations") or 0))
    total = row["total"]
    fraction = row["fraction"]
    if fraction is None and total:
        fraction = min(1.0, iterations / total)
    if row["state"] == "done":
        fraction = 1.0
    return JobProgress(
        task_id=row["task_id"], task_name=row["task_name"], state=row["state"], iterations=iterations,
        total=int(total) if total is not None else None, fraction=fraction,
        times_interrupted=int(counters.get("times_interrupted") or 0),
        total_time=float(counters.get("total_time") or 0.0), cursor=cursor, error=row["error"],
        started_at=row["started_at"], updated_at=row["updated_at"], finished_at=row["finished_at"])
