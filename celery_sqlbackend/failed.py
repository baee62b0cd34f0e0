"""Failed jobs, from Python: list them with their error, retry them, discard them.

A job is *failed* when it will not run again on its own: its worker died after
starting it (``ProcessPrunedError``), it went back to the queue ``max_releases``
times (``MaxReleasesExceeded``), its payload could not be decoded, or it was
rejected without requeue.  The job row is kept, with its task id, so that::

    from celery_sqlbackend import failed
    for job in failed.list_failed(store, error_class="ProcessPrunedError"):
        print(job.job_id, job.task_name, job.error)
    failed.retry(store, [job.job_id])           # back to ready, same task id
    failed.discard(store, [job.job_id])         # gone for good

``store`` is a :class:`celery_sqlbackend.store.Store`; :func:`store_for_app`
gives the one behind a Celery app's broker.  Every function runs short
transactions of its own; ``retry_all`` / ``discard_all`` work in batches so
that a million failed jobs never hold a lock for long.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Iterator, Mapping

from .store import Store, utcnow
from .urls import broker_url, mask

__all__ = ["FailedJob", "list_failed", "iter_failed", "retry", "discard", "retry_all", "discard_all",
           "store_for_app"]

#: The filters accepted by ``list_failed``, ``retry_all`` and ``discard_all``.
FILTERS = ("queue", "task_name", "error_class", "older_than")


@dataclass(frozen=True)
class FailedJob:
    job_id: int
    task_id: str | None
    task_name: str | None
    queue: str
    error_class: str
    error: str
    failed_at: datetime          # naive UTC, like every timestamp in the store
    created_at: datetime
    deliveries: int              # times the job was handed to a worker
    releases: int                # times a pruner put it back to ready


def store_for_app(app) -> Store:
    """The store behind ``app``'s ``sqlq+`` broker (ValueError if the broker is not ours)."""
    from .lifecycle import broker_store
    store = broker_store(app)
    if store is None:
        raise ValueError(f"the broker of app {app.main!r} is not an sqlq+ URL: {mask(broker_url(app.conf))!r}")
    return store


def _cutoff(older_than: timedelta | float | int | datetime | None) -> datetime | None:
    """``older_than`` as an absolute naive-UTC cutoff: an age (timedelta or seconds) or a datetime."""
    if older_than is None:
        return None
    if isinstance(older_than, datetime):
        if older_than.tzinfo is not None:
            older_than = older_than.astimezone(timezone.utc).replace(tzinfo=None)
        return older_than
    if not isinstance(older_than, timedelta):
        older_than = timedelta(seconds=float(older_than))
    if older_than < timedelta(0):
        raise ValueError(f"older_than must not be negative, got {older_than}")
    return utcnow() - older_than


def _query_filters(queue=None, task_name=None, error_class=None, older_than=None) -> dict[str, Any]:
    return {"queue": queue, "task_name": task_name, "error_class": error_class,
            "failed_before": _cutoff(older_than)}


def _check_filters(filters: Mapping[str, Any] | None) -> dict[str, Any]:
    filters = dict(filters or {})
    unknown = sorted(set(filters) - set(FILTERS))
    if unknown:
        raise ValueError(f"unknown failed-job filter(s) {', '.join(unknown)}; known: {', '.join(FILTERS)}")
    return filters


def _page(store: Store, where: dict[str, Any], after: int | None, limit: int | None) -> list[FailedJob]:
    rows = store.failed.list(after_job_id=after, limit=limit, **where)
    return [FailedJob(*row) for row in rows]


def list_failed(store: Store, queue: str | None = None, task_name: str | None = None,
                error_class: str | None = None, older_than: timedelta | float | datetime | None = None,
                limit: int | None = None) -> list[FailedJob]:
    """Failed jobs matching every filter given, oldest job first.

    ``older_than``: only jobs failed before that long ago (a timedelta or seconds) or
    before that moment (a datetime; naive means UTC).
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must not be negative, got {limit}")
    return _page(store, _query_filters(queue, task_name, error_class, older_than), None, limit)


def iter_failed(store: Store, filters: Mapping[str, Any] | None = None,
                batch_size: int = 500) -> Iterator[FailedJob]:
    """Every failed job matching ``filters``, fetched ``batch_size`` at a time."""
    where = _query_filters(**_check_filters(filters))
    after = None
    while True:
        page = _page(store, where, after, batch_size)
        yield from page
        if len(page) < batch_size:
            return
        after = page[-1].job_id


def _ids(job_ids: Iterable[int]) -> list[int]:
    return sorted({int(i) for i in job_ids})


def retry(store: Store, job_ids: Iterable[int]) -> int:
    """Put these failed jobs back to ready (same job, same task id); returns how many were failed.

    Ids that are not failed jobs (already retried, discarded, never failed) are ignored.
    """
    total = 0
    ids = _ids(job_ids)
    for i in range(0, len(ids), 500):
        total += store.failed.retry(job_ids=ids[i:i + 500], now=utcnow())
    return total


def discard(store: Store, job_ids: Iterable[int]) -> int:
    """Delete these failed jobs for good; returns how many were failed (others are ignored)."""
    total = 0
    ids = _ids(job_ids)
    for i in range(0, len(ids), 500):
        total += store.failed.discard(job_ids=ids[i:i + 500])
    return total


def _all(store: Store, action, filters: Mapping[str, Any] | None, batch_size: int) -> int:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    where = _query_filters(**_check_filters(filters))  # one cutoff for the whole run
    total, after = 0, None
    while True:
        page = _page(store, where, after, batch_size)
        if not page:
            return total
        total += action(store, [job.job_id for job in page])
        if len(page) < batch_size:
            return total
        after = page[-1].job_id


def retry_all(store: Store, filters: Mapping[str, Any] | None = None, batch_size: int = 500) -> int:
    """Retry every failed job matching ``filters`` (keys: queue, task_name, error_class, older_than)."""
    return _all(store, retry, filters, batch_size)


def discard_all(store: Store, filters: Mapping[str, Any] | None = None, batch_size: int = 500) -> int:
    """Discard every failed job matching ``filters`` (keys: queue, task_name, error_class, older_than)."""
    return _all(store, discard, filters, batch_size)
