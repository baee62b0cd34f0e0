"""The process registry: who holds which claims, and whether they are alive.

Each OS process that claims jobs has one ``LocalProcess`` per store: a row in
``processes``, a heartbeat thread of its own, and an ``AckBuffer``
(:mod:`.ack_buffer`) for the job state changes its acks report.  Every claim
names that row.

The heartbeat thread is deliberately independent of Celery's consumer (whose
own heartbeat stops at the *start* of a warm shutdown, while tasks are still
running: Solid Queue #568).  It beats from registration until ``stop()``,
which the worker calls only after the pool has drained (see ``lifecycle``).
Each beat is one UPDATE in its own short transaction; a failed beat is
logged and retried at the next interval, leaving nothing half-done.  After
each beat a second thread tidies this process (deferred acks, lost claims)
and runs the store's maintenance (:mod:`.maintenance`): a chore waiting on a
lock never holds up a beat.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import weakref
from datetime import timedelta
from typing import Callable, Iterable, Protocol, Sequence

from sqlalchemy.exc import SQLAlchemyError

from . import pid_identity, pruner
from .ack_buffer import AckBuffer
from .maintenance import Maintenance
from .store import Store, utcnow
from .worker_hooks import WorkerHooks

log = logging.getLogger("celery_sqlbackend.processes")


class ClaimHolder(Protocol):
    """A channel claiming for this process (``transport.Channel``)."""

    def held_job_ids(self) -> set[int]: ...


class LocalProcess:
    """This OS process, as registered in one store."""

    def __init__(self, store: Store):
        self.store = store
        self.pid = os.getpid()
        self.kind = "consumer"
        self.name = f"{self.kind}@{socket.gethostname()}"
        self.pool: str | None = None
        self.concurrency: int | None = None
        self.queues: list[str] = []
        self.id: int | None = None
        #: Set by the worker integration (``attach_worker``); None in a plain kombu consumer.
        self.worker: WorkerHooks | None = None
        self.acks = AckBuffer(store, current_id=lambda: self.id, name=lambda: self.name)
        self.maintenance = Maintenance(store)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Maintenance runs after each beat on a thread of its own (``_maintenance_loop``).
        self._maintenance_due = threading.Event()
        self._maintainer: threading.Thread | None = None
        # Channels claiming for this process, so that ``reconcile`` can tell
        # which claimed jobs it really has in hand.
        self._channels: "weakref.WeakSet[ClaimHolder]" = weakref.WeakSet()
        self.beats = 0
        self.last_beat_error: BaseException | None = None
        #: When the last heartbeat that reached the database was sent (monotonic), and whether claims
        #: are held back because that was longer than ``alive_threshold`` ago (``may_claim``).
        self._last_good_beat = time.monotonic()
        self._held_back = False
        #: Records the Celery results of jobs the store failed here (``failure_results``);
        #: set by the worker integration, which has the app.  None: nobody to tell.
        self.report_failed: Callable[[Sequence[int]], int] | None = None

    def describe(self, *, kind: str, name: str, pool: str | None = None, concurrency: int | None = None,
                 queues: Iterable[str] = ()) -> None:
        self.kind, self.name, self.pool, self.concurrency = kind, name, pool, concurrency
        self.queues = sorted(set(queues))

    def attach_worker(self, hooks: WorkerHooks) -> None:
        """A Celery worker owns this process's lifecycle (``lifecycle``): a channel closing
        on reconnect never deregisters it, and acks are written in batches."""
        self.worker = hooks
        self.acks.batched = True

    @property
    def managed(self) -> bool:
        """True when a Celery worker owns the lifecycle."""
        return self.worker is not None

    def claiming(self, channel: ClaimHolder) -> None:
        """``channel`` claims for this process (what it holds counts in ``reconcile``)."""
        self._channels.add(channel)

    # ------------------------------------------------------------------ register / deregister

    def record_failed(self, job_ids: Sequence[int]) -> None:
        """The store has failed ``job_ids`` (committed): let their Celery results say so."""
        if job_ids and self.report_failed is not None:
            self.report_failed(job_ids)

    def ensure_registered(self) -> int:
        """The process row id, registering (and starting heartbeats) on first use."""
        if self.id is None:
            with self._lock:
                if self.id is None:
                    self.register()
        return self.id

    def _insert_row(self) -> int:
        return self.store.processes.register(
            kind=self.kind, name=self.name, hostname=socket.gethostname(),
            pid=self.pid, pool=self.pool, concurrency=self.concurrency,
            queues=json.dumps(self.queues), now=utcnow(), pid_identity=pid_identity.identity())

    def register(self) -> int:
        self._last_good_beat = time.monotonic()
        self.id = self._insert_row()
        log.info("registered process %s as id %s", self.name, self.id)
        # A starting process sweeps what crashed processes left behind.
        self._maintain(first=True)
        self._start_heartbeat()
        return self.id

    def update_queues(self, queues: Iterable[str]) -> None:
        self.queues = sorted(set(self.queues) | set(queues))
        if self.id is not None:
            self.store.processes.set_queues(process_id=self.id, queues=json.dumps(self.queues))

    def set_concurrency(self, concurrency: int) -> None:
        """Record the pool size once the worker knows it (``-c auto`` is resolved after registration)."""
        self.concurrency = concurrency
        if self.id is not None:
            self.store.processes.set_concurrency(process_id=self.id, concurrency=concurrency)

    def stop(self) -> None:
        """Stop heartbeating (and the ack writer): call only when this process holds no running job."""
        self._stop.set()
        self._maintenance_due.set()   # (wakes the maintenance thread to see the stop)
        threads = (self._thread, self._maintainer)
        self._thread = self._maintainer = None
        for thread in threads:
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=self.store.options.busy_timeout + 5)
        self.acks.stop()

    def deregister(self, reason: str = "the worker shut down before the job finished", crashed: bool = False) -> None:
        """Write what the acks still owe, give back anything still claimed, then delete the process row.

        ``crashed``: the worker is exiting on an unrecoverable error; what it gives back counts
        toward ``max_releases`` (as a death would), so a message that crashes every worker ends in failed.
        """
        if self.id is None or os.getpid() != self.pid:
            return
        try:
            self.acks.flush()
            self.record_failed(self.acks.retry_deferred())
        except SQLAlchemyError as exc:
            log.warning("could not record deferred job states at exit (%s)", exc)
        process_id, self.id = self.id, None
        # One transaction: no moment where the row is gone but claims remain.
        released, failed = pruner.release_own_claims(self.store, process_id, reason, delete_process=True,
                                                     counted=crashed)
        if failed:
            log.warning("process %s left started jobs behind at exit: failed %s (%s); released %s",
                        self.name, failed, reason, released)
        elif released:
            # Prefetched jobs that never started go back to the queue: a normal shutdown does this.
            log.info("process %s returned %d prefetched job(s) to the queue at exit: %s",
                     self.name, len(released), released)
        self.record_failed(failed)
        log.info("deregistered process %s (id %s)", self.name, process_id)

    # ------------------------------------------------------------------ heartbeat thread

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._maintenance_due.clear()
        self._thread = threading.Thread(target=self._heartbeat_loop, name="sqlq-heartbeat", daemon=True)
        self._maintainer = threading.Thread(target=self._maintenance_loop, name="sqlq-maintenance", daemon=True)
        self._thread.start()
        self._maintainer.start()
        self.acks.start()

    def _heartbeat_loop(self) -> None:
        # Beats are scheduled on a fixed monotonic grid, and maintenance runs on
        # a thread of its own: a chore waiting for a lock (a frozen peer's open
        # transaction holds it until its connection goes) never delays a beat,
        # or the live process would look dead and be pruned.
        interval = self.store.options.heartbeat_interval
        next_beat = time.monotonic() + interval
        try:
            while not self._stop.wait(max(0.0, next_beat - time.monotonic())):
                if os.getpid() != self.pid:
                    return
                now = time.monotonic()
                # After a long stall (SIGSTOP, a suspended VM) beat once, not once per missed slot.
                next_beat = max(next_beat + interval, now + interval / 2)
                self.beat()
                self._maintenance_due.set()   # (one run at a time: a beat during a long one adds none)
        finally:
            # The connection this thread kept for its writes (``Store.run(single=True)``).
            self.store.close_own_connection()

    def _maintenance_loop(self) -> None:
        """Prune, promote, clear, flush deferred acks: after each beat, on this thread."""
        try:
            while True:
                self._maintenance_due.wait()
                self._maintenance_due.clear()
                if self._stop.is_set() or os.getpid() != self.pid:
                    return
                self._maintain()
        finally:
            self.store.close_own_connection()

    def beat(self) -> bool:
        process_id = self.id
        if process_id is None:
            return False
        sent = time.monotonic()
        try:
            # One statement: on PostgreSQL one round trip, on this thread's own connection.
            alive = self.store.processes.heartbeat(process_id=process_id, now=utcnow())
        except Exception as exc:  # never let a DB hiccup kill the thread
            self.last_beat_error = exc
            log.warning("heartbeat of %s failed (%s); retrying in %gs", self.name, exc,
                        self.store.options.heartbeat_interval)
            self.may_claim()
            return False
        if not alive:
            self._on_pruned_while_alive(process_id)
            return False
        self._beat_reached(sent)
        self.beats += 1
        return True

    def may_claim(self) -> bool:
        """False while this process's last heartbeat that reached the database is older than
        ``alive_threshold`` (beats failing, or a stall: SIGSTOP, a suspended VM).

        Why: other processes may already count it dead and prune it; a claim made
        now would be made for a row about to vanish, and the jobs would wait for
        the next prune.  Claiming resumes when a beat gets through (registering
        afresh if it was pruned meanwhile).  The log says so once each way.
        """
        if self.id is None or time.monotonic() - self._last_good_beat <= self.store.options.alive_threshold:
            return True
        with self._lock:
            if not self._held_back:
                self._held_back = True
                log.warning("%s has not heartbeated for more than alive_threshold (%gs): claiming no new "
                            "jobs until a heartbeat reaches the database", self.name,
                            self.store.options.alive_threshold)
        return False

    def _beat_reached(self, sent: float) -> None:
        """A heartbeat sent at ``sent`` (monotonic) was recorded: claims resume if they were held back."""
        self._last_good_beat = max(self._last_good_beat, sent)
        if self._held_back and self.may_claim():
            with self._lock:
                if self._held_back:
                    self._held_back = False
                    log.warning("%s heartbeats again (process id %s): claiming new jobs again", self.name, self.id)

    def _on_pruned_while_alive(self, process_id: int) -> None:
        # Another process decided we were dead (a frozen VM, a long pause, a
        # partitioned network).  Its decision stands: every claim we held is
        # gone and fenced updates on them will fail.  Register afresh so that
        # new claims have a live owner.
        log.error("process %s (id %s) was pruned while still alive: its jobs were released or failed "
                  "by the pruner and will not be marked finished here; registering again",
                  self.name, process_id)
        with self._lock:
            if self.id != process_id:  # deregistered, or already registered afresh
                return
            sent = time.monotonic()
            self.id = self._insert_row()
        self._beat_reached(sent)

    # ------------------------------------------------------------------ after each beat

    def _maintain(self, first: bool = False) -> None:
        try:
            try:
                self.acks.flush()
            except SQLAlchemyError:
                pass  # logged and deferred by flush
            self.record_failed(self.acks.retry_deferred())
            self.reconcile()
            self.record_failed(self.maintenance.run(exclude=self.id, first=first))
        except Exception as exc:
            log.warning("maintenance in %s failed (%s); will retry", self.name, exc)

    def reconcile(self, grace: float = 30.0) -> list[int]:
        """Release claims the store says we hold but this process does not know about.

        That happens when a claim committed but its reply never arrived (the
        connection dropped at the wrong moment): the jobs would otherwise stay
        claimed by a live process forever.  ``grace`` covers claims committed
        a moment ago that a channel is still delivering.
        """
        if self.id is None:
            return []
        held = set(self.store.claims.held_since(process_id=self.id, before=utcnow() - timedelta(seconds=grace)))
        if not held:
            return []
        # Channels first: a claim moves from a channel to the ack buffer, never back.
        known: set[int] = set()
        for channel in list(self._channels):
            known |= channel.held_job_ids()
        known |= self.acks.known_job_ids()
        lost = sorted(held - known)
        for job_id in lost:
            self.store.claims.release(job_id=job_id, process_id=self.id, now=utcnow())
        if lost:
            log.warning("released %d job(s) claimed by %s that it never received (a claim whose reply "
                        "was lost): %s", len(lost), self.name, lost)
        return lost


_local: dict[int, LocalProcess] = {}
_local_lock = threading.Lock()


def local_process(store: Store) -> LocalProcess:
    """This OS process's ``LocalProcess`` for ``store`` (a new one after fork)."""
    key = id(store)
    proc = _local.get(key)
    if proc is None or proc.pid != os.getpid():
        with _local_lock:
            proc = _local.get(key)
            if proc is None or proc.pid != os.getpid():
                proc = _local[key] = LocalProcess(store)
    return proc
