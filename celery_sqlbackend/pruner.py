"""Pruning: taking back what dead processes held, so that nothing is lost.

A process whose heartbeat is older than ``alive_threshold`` is dead as far
as the store is concerned.  In one transaction per dead process, its claims
are deleted and each job is

* **released** back to ready if it was never acked (prefetched, or an
  ``acks_late`` task mid-run: the redelivery an AMQP broker gives when a
  consumer dies), at most ``max_releases`` times, then failed;
* **failed** with ``ProcessPrunedError`` if it was acked and started (an
  early-ack task), because running it again could repeat its side effects;

and the process row is deleted.  Because finishing a job deletes the very
same claim row (``store.claims.finish``), a pruned job can never also be marked
finished: whichever transaction deletes the claim first wins.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta

from .errors import ProcessMissingError, ProcessPrunedError, WorkerCrashedError, WorkerShutdownError
from .store import Store, utcnow
from .store.processes import dead, delete_process as delete_process_row, recover, take_claims

log = logging.getLogger("celery_sqlbackend.pruner")


@dataclass
class PruneReport:
    processes: list[str] = field(default_factory=list)
    released: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.processes or self.released or self.failed)


def prune(store: Store, exclude: int | None = None) -> PruneReport:
    """Prune every process silent for longer than ``alive_threshold`` (except ``exclude``)."""
    report = PruneReport()
    cutoff = utcnow() - timedelta(seconds=store.options.alive_threshold)
    # The common case is "nobody is dead": find that out with a read, so that on
    # SQLite a live worker's routine check never takes the write lock.
    if not store.processes.any_dead(cutoff=cutoff, exclude=exclude):
        return report
    while True:
        pruned = store.run(_prune_one, store, cutoff, exclude)
        if pruned is None:
            return report
        name, released, failed = pruned
        report.processes.append(name)
        report.released += released
        report.failed += failed
        log.warning("pruned dead process %s: released %d job(s) %s, failed %d job(s) %s",
                    name, len(released), released, len(failed), failed)


def _prune_one(conn, store: Store, cutoff, exclude):
    t, d = store.t, store.dialect
    found = dead(conn, t, d, cutoff=cutoff, exclude=exclude)
    if not found:
        return None
    proc = found[0]
    name = f"{proc.name} (pid {proc.pid} on {proc.hostname}, process id {proc.id})"
    error = (f"{ProcessPrunedError.__name__}: process {name} was pruned: last heartbeat at "
             f"{proc.last_heartbeat_at.isoformat()}Z is older than alive_threshold "
             f"({store.options.alive_threshold:g}s)")
    orphans = take_claims(conn, t, d, process_ids=[proc.id])
    released, failed = recover(
        conn, t, d, orphans=orphans, max_releases=store.options.max_releases,
        error_class=ProcessPrunedError.__name__, error=error, now=utcnow())
    delete_process_row(conn, t, process_id=proc.id)
    return name, released, failed


def sweep_orphans(store: Store) -> PruneReport:
    """Recover claims whose process row no longer exists (a crash between steps)."""
    def _sweep(conn):
        orphans = take_claims(conn, store.t, store.dialect, process_ids=None)
        return recover(conn, store.t, store.dialect, orphans=orphans,
                               max_releases=store.options.max_releases,
                               error_class=ProcessMissingError.__name__,
                               error=f"{ProcessMissingError.__name__}: the job was claimed by a process that is no "
                                     "longer registered", now=utcnow())
    released, failed = store.run(_sweep)
    if released or failed:
        log.warning("recovered orphaned claims: released %s, failed %s", released, failed)
    return PruneReport([], released, failed)


def release_own_claims(store: Store, process_id: int, reason: str,
                       delete_process: bool = False, counted: bool = False) -> tuple[list[int], list[int]]:
    """Give back what this process still holds on its way out (cold shutdown, consumer exit).

    Jobs never started go back to ready without counting toward ``max_releases``
    (their process did not die); started ones are failed with ``reason``.  With
    ``delete_process`` the process row goes in the same transaction, so that no
    claim can ever name a process that is no longer registered.  ``counted``: the process
    is crashing, and its releases count toward ``max_releases`` like a death.
    """
    def _release(conn):
        orphans = take_claims(conn, store.t, store.dialect, process_ids=[process_id])
        result = recover(conn, store.t, store.dialect, orphans=orphans,
                                 max_releases=store.options.max_releases if counted else None,
                                 error_class=(WorkerCrashedError if counted else WorkerShutdownError).__name__,
                                 error=reason, now=utcnow())
        if delete_process:
            delete_process_row(conn, store.t, process_id=process_id)
        return result
    return store.run(_release)
