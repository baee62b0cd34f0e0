"""Pruning: taking back what dead processes held, so that nothing is lost.

A process whose heartbeat is older than ``alive_threshold`` is dead as far
as the store is concerned; so is one registered from this host whose PID
the operating system says no longer runs that process (``pid_identity``: no
waiting for the threshold), and one an operator forces out
(``celery sqlq prune --process``).  In one transaction per dead process, its
claims are deleted and each job is

* **released** back to ready if it was never acked (prefetched, or an
  ``acks_late`` task mid-run: the redelivery an AMQP broker gives when a
  consumer dies), at most ``max_releases`` times, then failed;
* **failed** with ``ProcessPrunedError`` if it was acked and started (an
  early-ack task), because running it again could repeat its side effects;

and the process row is deleted.  The jobs it failed are returned, so that
whoever pruned can record their Celery results (``failure_results``) once
the transaction has committed.  Because finishing a job deletes the very
same claim row (``store.claims.finish``), a pruned job can never also be marked
finished: whichever transaction deletes the claim first wins.
"""
from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Sequence

from . import pid_identity
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


def prune(store: Store, exclude: int | None = None, force: Sequence[int] = ()) -> PruneReport:
    """Prune every process silent for longer than ``alive_threshold``, every process of this host
    whose PID is gone, and the processes ``force`` names (an operator's decision); never ``exclude``."""
    report = PruneReport()
    cutoff = utcnow() - timedelta(seconds=store.options.alive_threshold)
    gone = gone_here(store, exclude)
    forced = [process_id for process_id in force if process_id != exclude]
    # The common case is "nobody is dead": find that out with a read, so that on
    # SQLite a live worker's routine check never takes the write lock.
    if not (gone or forced or store.processes.any_dead(cutoff=cutoff, exclude=exclude)):
        return report
    pending_gone, pending_forced = set(gone), set(forced)
    while True:
        pruned = store.run(_prune_one, store, cutoff, exclude, frozenset(pending_gone), frozenset(pending_forced))
        if pruned is None:
            return report
        process_id, name, released, failed = pruned
        pending_gone.discard(process_id)
        pending_forced.discard(process_id)
        report.processes.append(name)
        report.released += released
        report.failed += failed
        log.warning("pruned dead process %s: released %d job(s) %s, failed %d job(s) %s",
                    name, len(released), released, len(failed), failed)


def gone_here(store: Store, exclude: int | None) -> list[int]:
    """Processes registered from this host whose PID no longer runs them (asked of the OS)."""
    return [row.id for row in store.processes.on_host(hostname=socket.gethostname(), exclude=exclude)
            if pid_identity.is_gone(row.pid, row.pid_identity)]


def _prune_one(conn, store: Store, cutoff, exclude, gone: frozenset[int], forced: frozenset[int]):
    t, d = store.t, store.dialect
    found = dead(conn, t, d, cutoff=cutoff, exclude=exclude, ids=sorted(gone | forced))
    if not found:
        return None
    proc = found[0]
    name = f"{proc.name} (pid {proc.pid} on {proc.hostname}, process id {proc.id})"
    if proc.id in forced:
        why = "an operator forced it out (celery sqlq prune --process)"
    elif proc.last_heartbeat_at < cutoff:
        why = (f"last heartbeat at {proc.last_heartbeat_at.isoformat()}Z is older than alive_threshold "
               f"({store.options.alive_threshold:g}s)")
    else:
        why = (f"pid {proc.pid} no longer runs it on {proc.hostname} (checked by PID and process start time; "
               f"last heartbeat at {proc.last_heartbeat_at.isoformat()}Z)")
    error = f"{ProcessPrunedError.__name__}: process {name} was pruned: {why}"
    orphans = take_claims(conn, t, d, process_ids=[proc.id])
    released, failed = recover(
        conn, t, d, orphans=orphans, max_releases=store.options.max_releases,
        error_class=ProcessPrunedError.__name__, error=error, now=utcnow())
    delete_process_row(conn, t, process_id=proc.id)
    return proc.id, name, released, failed


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
