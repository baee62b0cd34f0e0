"""The process registry: who holds which claims, and whether they are alive.

Each OS process that claims jobs has one ``LocalProcess`` per store: a row in
``processes`` and a heartbeat thread of its own.  Every claim names that row.

The heartbeat thread is deliberately independent of Celery's consumer (whose
own heartbeat stops at the *start* of a warm shutdown, while tasks are still
running: Solid Queue #568).  It beats from registration until ``stop()``,
which the worker calls only after the pool has drained (see ``lifecycle``).
Each beat is one UPDATE in its own short transaction; a failed beat is
logged and retried at the next interval, leaving nothing half-done.  The same
thread prunes dead processes and clears old finished jobs.

Job state changes reported by acks (started, finished) are queued and written
in batches: by the claim loop, in the same transaction as its next claim, or,
while that loop is blocked handing a job to a busy pool, by a small writer
thread after ``WRITE_DELAY``.
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import socket
import threading
import weakref
import time
from datetime import timedelta
from typing import Iterable

from sqlalchemy.exc import SQLAlchemyError

from . import fanout, pruner
from .store import Store, queries, utcnow

log = logging.getLogger("celery_sqlbackend.processes")

#: How long acks wait for the claim loop before the writer thread writes them.
WRITE_DELAY = 0.02


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
        #: True when a Celery worker owns the lifecycle (lifecycle.py), so that
        #: a kombu channel closing on reconnect never deregisters the process.
        self.managed = False
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: job id -> ("finish" | "release", process id that claimed it): state
        #: changes that failed because the database was away, retried by the
        #: heartbeat thread until they land.
        # (job id, process id) pairs whose task is done, recorded in batches.
        self._to_finish: collections.deque = collections.deque()
        self._to_mark: collections.deque = collections.deque()
        #: Channels claiming for this process, so that ``reconcile`` can tell
        #: which claimed jobs it really has in hand.
        self.channels: "weakref.WeakSet" = weakref.WeakSet()
        #: delivery tag -> (job id, process id, since): claims of channels that
        #: closed on a lost connection while Celery may still run them.
        self.adopted: dict[str, tuple[int, int, float]] = {}
        #: Non-zero while the claim loop is away: inside a delivery, or waiting for acks
        #: (see ``loop_away``); the writer thread writes acks meanwhile.
        self._loop_away = 0
        self._writes_waiting = threading.Event()
        self._writer: threading.Thread | None = None
        self._deferred: dict[int, tuple[str, int | None]] = {}
        # delivery tag -> (job id, process id that claimed it) of early-acked
        # jobs still running.  Kept per process, not per channel: a channel
        # closed by a reconnect must not forget jobs still running in the pool.
        # The claiming id is kept because every state change is fenced on it:
        # after being pruned while alive this process registers under a new id,
        # and must not finish (under that new id) a job it claimed again since.
        self._started: dict[str, tuple[int, int | None]] = {}
        self._last_clear = 0.0
        self.beats = 0
        self.last_beat_error: BaseException | None = None
        self.last_beat_at = None

    def describe(self, *, kind: str, name: str, pool: str | None = None, concurrency: int | None = None,
                 queues: Iterable[str] = ()) -> None:
        self.kind, self.name, self.pool, self.concurrency = kind, name, pool, concurrency
        self.queues = sorted(set(queues))

    # ------------------------------------------------------------------ register / deregister

    def ensure_registered(self) -> int:
        """The process row id, registering (and starting heartbeats) on first use."""
        if self.id is None:
            with self._lock:
                if self.id is None:
                    self.register()
        return self.id

    def register(self) -> int:
        self.id = self.store.q(
            "register_process", kind=self.kind, name=self.name, hostname=socket.gethostname(),
            pid=self.pid, pool=self.pool, concurrency=self.concurrency,
            queues=json.dumps(self.queues), now=utcnow())
        log.info("registered process %s as id %s", self.name, self.id)
        # A starting process sweeps what crashed processes left behind.
        self._maintain(first=True)
        self._start_heartbeat()
        return self.id

    def update_queues(self, queues: Iterable[str]) -> None:
        self.queues = sorted(set(self.queues) | set(queues))
        if self.id is not None:
            self.store.q("update_process", process_id=self.id, queues=json.dumps(self.queues))

    def stop(self) -> None:
        """Stop heartbeating: call only when this process holds no running job."""
        self._stop.set()
        for thread in (self._thread, self._writer):
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=self.store.options.busy_timeout + 5)
        self._thread = self._writer = None

    def deregister(self, reason: str = "the worker shut down before the job finished") -> None:
        """Give back anything still claimed, then delete the process row."""
        if self.id is None or os.getpid() != self.pid:
            return
        try:
            self.flush()
            self._retry_deferred()
        except SQLAlchemyError as exc:
            log.warning("could not record deferred job states at exit (%s)", exc)
        process_id, self.id = self.id, None
        # One transaction: no moment where the row is gone but claims remain.
        released, failed = pruner.release_own_claims(self.store, process_id, reason, delete_process=True)
        if released or failed:
            log.warning("process %s left claims behind at exit: released %s, failed %s",
                        self.name, released, failed)
        log.info("deregistered process %s (id %s)", self.name, process_id)

    # ------------------------------------------------------------------ heartbeat thread

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._closing_own_connection, args=(self._heartbeat_loop,),
                                        name="sqlq-heartbeat", daemon=True)
        self._thread.start()
        self._writer = threading.Thread(target=self._closing_own_connection, args=(self._writer_loop,),
                                        name="sqlq-writer", daemon=True)
        self._writer.start()

    def _closing_own_connection(self, loop) -> None:
        """Run a thread's loop, then close the connection it kept for its writes (``Store.run(single=True)``)."""
        try:
            loop()
        finally:
            self.store.close_own_connection()

    def _heartbeat_loop(self) -> None:
        # Beats are scheduled on a fixed monotonic grid, so that time spent in
        # maintenance (pruning, clearing) never pushes the next beat later.
        interval = self.store.options.heartbeat_interval
        next_beat = time.monotonic() + interval
        while not self._stop.wait(max(0.0, next_beat - time.monotonic())):
            if os.getpid() != self.pid:
                return
            now = time.monotonic()
            # After a long stall (SIGSTOP, a suspended VM) beat once, not once per missed slot.
            next_beat = max(next_beat + interval, now + interval / 2)
            self.beat()
            if self._stop.is_set():
                return
            self._maintain()

    def beat(self) -> bool:
        process_id = self.id
        if process_id is None:
            return False
        try:
            # One statement: on PostgreSQL one round trip, on this thread's own connection.
            alive = self.store.q("heartbeat", process_id=process_id, now=utcnow(), single=True)
        except Exception as exc:  # never let a DB hiccup kill the thread
            self.last_beat_error = exc
            log.warning("heartbeat of %s failed (%s); retrying in %gs", self.name, exc,
                        self.store.options.heartbeat_interval)
            return False
        if not alive:
            self._on_pruned_while_alive(process_id)
            return False
        self.beats += 1
        self.last_beat_at = utcnow()
        return True

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
            self.id = self.store.q(
                "register_process", kind=self.kind, name=self.name, hostname=socket.gethostname(),
                pid=self.pid, pool=self.pool, concurrency=self.concurrency,
                queues=json.dumps(self.queues), now=utcnow())

    # ------------------------------------------------------------------ job state (fenced)

    def started(self, tag: str, job_id: int, process_id: int | None = None) -> None:
        """An early ack: the job is running; a pruner must fail it, not re-run it.

        ``process_id`` is the id the job was claimed under (default: the current one).
        In a worker the mark is written by the main loop's next ``flush`` (one
        transaction for every ack since the last), a few milliseconds later.
        """
        process_id = self.id if process_id is None else process_id
        self._started[tag] = (job_id, process_id)
        log.debug("job %s started (early ack)", job_id)
        if self.managed:
            self._to_mark.append((job_id, process_id))
            self._wake_writer_if_loop_away()
        elif not self.store.q("mark_acked", job_id=job_id, process_id=process_id, now=utcnow()):
            log.error("job %s was taken from process %s (id %s, pruned) before it started; it runs "
                      "here anyway and will not be marked finished", job_id, self.name, process_id)

    def finish(self, job_id: int, process_id: int | None = None) -> bool:
        """Mark the job finished iff the claim made under ``process_id`` (default: current id) stands."""
        process_id = self.id if process_id is None else process_id
        keep = self.store.options.keep_finished > 0
        try:
            done = self.store.q("finish", job_id=job_id, process_id=process_id, now=utcnow(), keep=keep)
        except SQLAlchemyError as exc:
            # The database is away: the job did finish, so keep trying from the
            # heartbeat thread rather than leaving it claimed forever.
            log.warning("could not record job %s as finished (%s); retrying from the heartbeat thread",
                        job_id, exc)
            self._deferred[job_id] = ("finish", process_id)
            return False
        if not done:
            self._log_claim_lost(job_id, process_id)
        return done

    def _log_claim_lost(self, job_id: int, process_id: int | None) -> None:
        log.error("job %s finished in %s, but its claim (process id %s) had been taken away: the "
                  "process was pruned, and the pruner's decision (released or failed) stands",
                  job_id, self.name, process_id)

    def finish_later(self, job_id: int, process_id: int | None = None) -> None:
        """Queue a finish for the next ``flush`` (one transaction for many acks)."""
        self._to_finish.append((job_id, self.id if process_id is None else process_id))
        self._wake_writer_if_loop_away()

    def _wake_writer_if_loop_away(self) -> None:
        if self._loop_away:
            self._writes_waiting.set()

    @contextlib.contextmanager
    def loop_away(self):
        """The claim loop will not write for a while (it is delivering, or waiting for acks)."""
        self._loop_away += 1
        try:
            self._wake_writer_if_loop_away()   # acks queued before it left, too
            yield
        finally:
            self._loop_away -= 1

    def _writer_loop(self) -> None:
        """Write acks the claim loop cannot, while it is away.

        Under prefork, Celery's main loop blocks inside a delivery while every
        pool process is busy (billiard's apply_async waits for a free one),
        possibly for as long as a task runs; and between claims it waits for
        enough acks to make the next claim worth a transaction.  Acks queued
        meanwhile are written here after ``WRITE_DELAY`` (so they still go in
        batches), unless the loop, back, has taken them with its next claim.
        """
        while not self._stop.is_set():
            if not self._writes_waiting.wait(1.0):
                continue
            self._writes_waiting.clear()
            while self.has_pending_writes and not self._stop.wait(WRITE_DELAY):
                if self._loop_away:
                    try:
                        self.flush()
                    except SQLAlchemyError:
                        pass  # logged and deferred by flush

    def flush(self, claim: dict | None = None) -> list:
        """Write the queued started-marks and finishes in one transaction, with the next claim if asked.

        The claim loop passes its claim (``queries.claim``'s ``queues``,
        ``limit`` and ``process_id``), so that a busy worker writes once per
        loop for everything: the acks since the last loop and the next batch
        of jobs.  On PostgreSQL that is one statement, sent without BEGIN and
        COMMIT: one round trip.  Returns the jobs claimed.
        """
        marks, finishes = _drain(self._to_mark), _drain(self._to_finish)
        if not marks and not finishes and claim is None:
            return []
        store = self.store
        keep = store.options.keep_finished > 0
        t, d = store.t, store.dialect

        def write(conn):
            if claim is None:
                return queries.record_acks(conn, t, d, marks=marks, finishes=finishes, now=utcnow(), keep=keep), []
            return queries.acks_and_claim(conn, t, d, marks=marks, finishes=finishes, keep=keep, now=utcnow(),
                                          **claim)

        try:
            done, claimed = store.run(write, single=queries.one_statement(d, marks, finishes))
        except SQLAlchemyError as exc:
            if marks or finishes:
                log.warning("could not record %d started and %d finished job(s) (%s); retrying from the "
                            "heartbeat thread", len(marks), len(finishes), exc)
            for job_id, process_id in finishes:
                self._deferred[job_id] = ("finish", process_id)
            raise
        if marks or finishes:
            log.debug("recorded %d started and %d finished job(s)", len(marks), len(finishes))
        done = set(done)
        for job_id, process_id in finishes:
            if job_id not in done:
                self._log_claim_lost(job_id, process_id)
        return claimed

    @property
    def has_pending_writes(self) -> bool:
        return bool(self._to_mark or self._to_finish)

    def finish_completed(self, running: set[str]) -> None:
        """Queue finishes for the early-acked jobs whose delivery tag is not in ``running``."""
        for tag in list(self._started):
            if tag not in running:
                entry = self._started.pop(tag, None)
                if entry is not None:
                    self._to_finish.append(entry)

    @property
    def running_jobs(self) -> list[int]:
        return [job_id for job_id, _ in self._started.values()]

    # ------------------------------------------------------------------ maintenance

    def defer_release(self, job_id: int, process_id: int | None = None) -> None:
        """Remember a release that failed (database down) to retry from the heartbeat thread."""
        self._deferred[job_id] = ("release", self.id if process_id is None else process_id)

    def _maintain(self, first: bool = False) -> None:
        try:
            try:
                self.flush()
            except SQLAlchemyError:
                pass  # logged and deferred by flush
            self._retry_deferred()
            self.reconcile()
            if first:
                pruner.sweep_orphans(self.store)
            pruner.prune(self.store, exclude=self.id)
            self._clear_finished()
            fanout.maintain(self.store)
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
        held = set(self.store.read(queries.claims_of, self.store.t, process_id=self.id,
                                   before=utcnow() - timedelta(seconds=grace)))
        if not held:
            return []
        known = {job_id for job_id, _ in self._started.values()}
        known |= {job_id for job_id, _ in list(self._to_finish) + list(self._to_mark)}
        known |= set(self._deferred)
        for channel in list(self.channels):
            known |= {job_id for job_id, _ in list(channel._claims.values())}
        now = time.monotonic()
        for tag, (job_id, _, since) in list(self.adopted.items()):
            if now - since < grace:
                known.add(job_id)
            else:
                self.adopted.pop(tag, None)   # never acked: Celery dropped it with the old connection
        lost = sorted(held - known)
        for job_id in lost:
            self.store.q("release", job_id=job_id, process_id=self.id, now=utcnow())
        if lost:
            log.warning("released %d job(s) claimed by %s that it never received (a claim whose reply "
                        "was lost): %s", len(lost), self.name, lost)
        return lost

    def _retry_deferred(self) -> None:
        for job_id, (op, process_id) in list(self._deferred.items()):
            if process_id is None:
                self._deferred.pop(job_id, None)
            elif op == "finish":
                self._deferred.pop(job_id, None)
                self.finish(job_id, process_id)   # re-defers itself if the database is still away
            else:
                # Fenced like every release: a no-op if a pruner took the claim meanwhile.
                self.store.q("release", job_id=job_id, process_id=process_id, now=utcnow())
                self._deferred.pop(job_id, None)

    def _clear_finished(self) -> None:
        opts = self.store.options
        # Clearing history is not urgent: at most every 30 s (or every beat if slower),
        # so that frequent beats do not each take the write lock for it.
        now = time.monotonic()
        if now - self._last_clear < max(30.0, opts.heartbeat_interval):
            return
        self._last_clear = now
        before = utcnow() - timedelta(seconds=opts.keep_finished)
        for _ in range(20):  # bounded per beat; short transactions, no long locks
            if self.store.q("clear_finished", before=before, limit=opts.clear_batch_size) < opts.clear_batch_size:
                break


def _drain(queue: collections.deque) -> list:
    """Pop everything from a deque other threads append to."""
    items = []
    try:
        while True:
            items.append(queue.popleft())
    except IndexError:
        return items


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


def all_local() -> list[LocalProcess]:
    return [p for p in _local.values() if p.pid == os.getpid()]
