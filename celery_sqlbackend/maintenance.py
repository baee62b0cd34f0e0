"""Keeping the store tidy: everything that is nobody's job in particular, in one place.

Why one module: these chores run from two places, and must do the same
there: every worker's maintenance thread (``Maintenance.run``, after each beat) and
the operator's ``celery sqlq prune`` / ``clear-finished`` (``prune_now``,
``clear_finished``).  Each chore is a series of short transactions of at
most ``clear_batch_size`` rows, safe to run from any number of processes at
once.

* prune dead processes, recover orphaned claims     (:mod:`.pruner`)
* promote due scheduled (ETA) jobs to ready         ``promote_due`` (the claim
  loop runs it too, every ``dispatch_interval``: see ``Channel._claim``)
* clear old finished jobs                           ``clear_finished``
  (and unique keys whose time-limited hold is over: ``store.unique_keys``)
* expire fanout and reply queues nobody reads       (:func:`.fanout.maintain`)

Result expiry (``result_expires``) stays with the result backend's
``cleanup``, which Celery's beat runs: a worker does not know its app's
result settings.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable, Sequence

from . import fanout, pruner
from .limits import worker as limit_worker
from .errors import ConfigurationError
from .store import Store, utcnow

log = logging.getLogger("celery_sqlbackend.maintenance")

#: Batches of ``clear_finished`` per heartbeat: bounded, so that a beat never runs long.
CLEAR_BATCHES_PER_BEAT = 20


def promote_due(store: Store) -> int:
    """Move scheduled jobs whose time has come to ready (or blocked, by their limits), and let
    blocked jobs in where slots were freed without a word (``limits.worker.chores``); returns how many."""
    batch = store.options.clear_batch_size
    total = limit_worker.chores(store)
    while True:
        n = store.executions.dispatch_due(now=utcnow(), limit=batch)
        total += n
        if n < batch:
            return total


def clear_finished(store: Store, before: datetime, *, batch_size: int | None = None,
                   max_batches: int | None = None, on_progress: Callable[[int], None] | None = None) -> int:
    """Delete jobs finished before ``before``, ``batch_size`` rows per transaction; returns how many."""
    batch = store.options.clear_batch_size if batch_size is None else batch_size
    if batch < 1:
        raise ConfigurationError(f"batch_size must be at least 1, got {batch}")   # (-1 would never end on SQLite)
    total = batches = 0
    while max_batches is None or batches < max_batches:
        n = store.jobs.clear_finished(before=before, limit=batch)
        batches += 1
        total += n
        if on_progress and n:
            on_progress(n)
        if n < batch:
            break
    return total


@dataclass
class PruneResult:
    processes: list[str]
    released: list[int]
    failed: list[int]
    expired_queues: list[str]
    dropped_messages: int


def prune_now(store: Store, force: Sequence[int] = (),
              report_failed: Callable[[Sequence[int]], int] | None = None) -> PruneResult:
    """What ``celery sqlq prune`` does: prune dead processes (and those ``force`` names), recover
    orphaned claims, and expire the transient queues of remote control and events nobody reads.
    ``report_failed`` records the Celery results of the jobs it failed (``failure_results``)."""
    report = pruner.prune(store, force=force)
    orphans = pruner.sweep_orphans(store)
    limit_worker.chores(store)     # the slots of the jobs it failed
    if report_failed is not None:
        report_failed(report.failed + orphans.failed)
    expired = fanout.maintain(store)
    return PruneResult(report.processes, report.released + orphans.released, report.failed + orphans.failed,
                       expired.expired_queues, expired.dropped_messages)


class Maintenance:
    """The chores one live process runs after each heartbeat."""

    def __init__(self, store: Store):
        self.store = store
        self._last_clear = 0.0

    def run(self, exclude: int | None, first: bool = False) -> list[int]:
        """``exclude``: this process's own id (never pruned by itself); ``first``: it just registered,
        and sweeps what crashed processes left behind.  Returns the jobs it failed (committed), whose
        Celery results the caller records."""
        failed: list[int] = []
        if first:
            failed += pruner.sweep_orphans(self.store).failed
        failed += pruner.prune(self.store, exclude=exclude).failed
        limit_worker.chores(self.store)     # the slots of the jobs it failed, and of those gone
        self._clear_finished()
        fanout.maintain(self.store)
        return failed

    def _clear_finished(self) -> None:
        opts = self.store.options
        # Clearing history is not urgent: at most every 30 s (or every beat if slower),
        # so that frequent beats do not each take the write lock for it.
        now = time.monotonic()
        if now - self._last_clear < max(30.0, opts.heartbeat_interval):
            return
        self._last_clear = now
        clear_finished(self.store, utcnow() - timedelta(seconds=opts.keep_finished),
                       max_batches=CLEAR_BATCHES_PER_BEAT)
        limit_worker.forget_idle(self.store)
        # Time-limited unique keys (``sqlq_unique_for=<seconds>``) past their time: nobody
        # needs them (an enqueue takes an expired key over anyway); bounded like the rest.
        for _ in range(CLEAR_BATCHES_PER_BEAT):
            if self.store.unique_keys.clear_expired(now=utcnow(), limit=opts.clear_batch_size) < opts.clear_batch_size:
                break
