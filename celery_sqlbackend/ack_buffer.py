"""Acks on their way to the database: queued, written in batches, retried when the database is away.

Why a buffer: a busy worker acks hundreds of jobs a second, and a transaction
per ack would cost more than the jobs.  Job state changes reported by acks
(started, finished) are queued here and written in batches: by the claim
loop, in the same transaction as its next claim (``flush(claim=…)``), or,
while that loop is blocked handing a job to a busy pool, by a small writer
thread after ``WRITE_DELAY``.

Every state change is fenced on the process id the job was *claimed under*,
not the current one: after being pruned while alive a process registers
under a new id, and must not finish (under that new id) a job it claimed
again since.  A change that fails because the database is away is deferred
and retried from the heartbeat thread (``retry_deferred``) until it lands.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from typing import Callable

from sqlalchemy.exc import SQLAlchemyError

from .store import Store, utcnow

log = logging.getLogger("celery_sqlbackend.processes")

#: How long acks wait for the claim loop before the writer thread writes them.
WRITE_DELAY = 0.02

#: (job id, process id the job was claimed under)
Claim = tuple[int, int]


class AckBuffer:
    """The pending job state changes of one process in one store, and the thread that writes them."""

    def __init__(self, store: Store, current_id: Callable[[], int | None], name: Callable[[], str]):
        self.store = store
        self._current_id = current_id
        self._name = name
        #: True in a Celery worker: early-ack "started" marks are batched too
        #: (a plain consumer writes each at once and checks it landed).
        self.batched = False
        self._to_finish: collections.deque = collections.deque()
        self._to_mark: collections.deque = collections.deque()
        # job id -> ("finish" | "release", process id that claimed it): state
        # changes that failed because the database was away.
        self._deferred: dict[int, tuple[str, int | None]] = {}
        # delivery tag -> (job id, process id that claimed it) of early-acked
        # jobs still running.  Kept per process, not per channel: a channel
        # closed by a reconnect must not forget jobs still running in the pool.
        self._started: dict[str, tuple[int, int | None]] = {}
        #: delivery tag -> (job id, process id, since): claims of channels that
        #: closed while Celery may still run them (see ``Channel._restore``).
        self._adopted: dict[str, tuple[int, int, float]] = {}
        # Non-zero while the claim loop is away: inside a delivery, or waiting
        # for acks (see ``loop_away``); the writer thread writes acks meanwhile.
        self._loop_away = 0
        self._writes_waiting = threading.Event()
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None

    def _default(self, process_id: int | None) -> int | None:
        return self._current_id() if process_id is None else process_id

    # ------------------------------------------------------------------ writer thread

    def start(self) -> None:
        self._stop.clear()
        self._writer = threading.Thread(target=self._writer_loop, name="sqlq-writer", daemon=True)
        self._writer.start()

    def stop(self) -> None:
        self._stop.set()
        writer, self._writer = self._writer, None
        if writer is not None and writer is not threading.current_thread():
            writer.join(timeout=self.store.options.busy_timeout + 5)

    def _writer_loop(self) -> None:
        """Write acks the claim loop cannot, while it is away.

        Under prefork, Celery's main loop blocks inside a delivery while every
        pool process is busy (billiard's apply_async waits for a free one),
        possibly for as long as a task runs; and between claims it waits for
        enough acks to make the next claim worth a transaction.  Acks queued
        meanwhile are written here after ``WRITE_DELAY`` (so they still go in
        batches), unless the loop, back, has taken them with its next claim.
        """
        try:
            while not self._stop.is_set():
                if not self._writes_waiting.wait(1.0):
                    continue
                self._writes_waiting.clear()
                while self.has_pending_writes and not self._stop.wait(WRITE_DELAY):
                    if self._loop_away:
                        with contextlib.suppress(SQLAlchemyError):   # logged and deferred by flush
                            self.flush()
        finally:
            self.store.close_own_connection()

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

    # ------------------------------------------------------------------ acks

    def started(self, tag: str, job_id: int, process_id: int | None = None) -> None:
        """An early ack: the job is running; a pruner must fail it, not re-run it.

        ``process_id`` is the id the job was claimed under (default: the current one).
        In a worker (``batched``) the mark is written by the main loop's next
        ``flush`` (one transaction for every ack since the last), a few milliseconds later.
        """
        process_id = self._default(process_id)
        self._started[tag] = (job_id, process_id)
        log.debug("job %s started (early ack)", job_id)
        if self.batched:
            self._to_mark.append((job_id, process_id))
            self._wake_writer_if_loop_away()
        elif not self.store.claims.mark_acked(job_id=job_id, process_id=process_id, now=utcnow()):
            log.error("job %s was taken from process %s (id %s, pruned) before it started; it runs "
                      "here anyway and will not be marked finished", job_id, self._name(), process_id)

    def finish(self, job_id: int, process_id: int | None = None) -> bool:
        """Mark the job finished iff the claim made under ``process_id`` (default: current id) stands."""
        process_id = self._default(process_id)
        keep = self.store.options.keep_finished > 0
        try:
            done = self.store.claims.finish(job_id=job_id, process_id=process_id, now=utcnow(), keep=keep)
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

    def finish_later(self, job_id: int, process_id: int | None = None) -> None:
        """Queue a finish for the next ``flush`` (one transaction for many acks)."""
        self._to_finish.append((job_id, self._default(process_id)))
        self._wake_writer_if_loop_away()

    def finish_completed(self, running: set[str]) -> None:
        """Queue finishes for the early-acked jobs whose delivery tag is not in ``running``."""
        for tag in list(self._started):
            if tag not in running:
                entry = self._started.pop(tag, None)
                if entry is not None:
                    self._to_finish.append(entry)

    def _log_claim_lost(self, job_id: int, process_id: int | None) -> None:
        if self.store.failed.failed_by_task(job_id=job_id):
            # Its task raised and the task's process kept it as failed (``task_failures``): nothing was lost.
            log.debug("job %s ended failed in its task: kept as a failed execution", job_id)
            return
        log.error("job %s finished in %s, but its claim (process id %s) had been taken away: the "
                  "process was pruned, and the pruner's decision (released or failed) stands",
                  job_id, self._name(), process_id)

    @property
    def has_pending_writes(self) -> bool:
        return bool(self._to_mark or self._to_finish)

    @property
    def running_jobs(self) -> list[int]:
        return [job_id for job_id, _ in self._started.values()]

    def flush(self, claim: dict | None = None) -> list:
        """Write the queued started-marks and finishes in one transaction, with the next claim if asked.

        The claim loop passes its claim (``store.claims.claim``'s ``queues``,
        ``limit`` and ``process_id``), so that a busy worker writes once per
        loop for everything: the acks since the last loop and the next batch
        of jobs.  On PostgreSQL that is one statement, sent without BEGIN and
        COMMIT: one round trip.  Returns the jobs claimed.
        """
        marks, finishes = _drain(self._to_mark), _drain(self._to_finish)
        if not marks and not finishes and claim is None:
            return []
        claims = self.store.claims
        keep = self.store.options.keep_finished > 0
        try:
            if claim is None:
                done, claimed = claims.record_acks(marks=marks, finishes=finishes, now=utcnow(), keep=keep), []
            else:
                done, claimed = claims.acks_and_claim(marks=marks, finishes=finishes, keep=keep, now=utcnow(),
                                                      **claim)
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

    # ------------------------------------------------------------------ releases and hand-overs

    def defer_release(self, job_id: int, process_id: int | None = None) -> None:
        """Remember a release that failed (database down) to retry from the heartbeat thread."""
        self._deferred[job_id] = ("release", self._default(process_id))

    def retry_deferred(self) -> None:
        for job_id, (op, process_id) in list(self._deferred.items()):
            if process_id is None:
                self._deferred.pop(job_id, None)
            elif op == "finish":
                self._deferred.pop(job_id, None)
                self.finish(job_id, process_id)   # re-defers itself if the database is still away
            else:
                # Fenced like every release: a no-op if a pruner took the claim meanwhile.
                self.store.claims.release(job_id=job_id, process_id=process_id, now=utcnow())
                self._deferred.pop(job_id, None)

    def adopt(self, tag: str, claim: Claim) -> None:
        """Keep the claim of a closing channel's delivery that Celery may still run (and ack)."""
        self._adopted[tag] = (*claim, time.monotonic())

    def take_adopted(self, tag: str) -> Claim | None:
        entry = self._adopted.pop(tag, None)
        return None if entry is None else entry[:2]

    def known_job_ids(self, grace: float) -> set[int]:
        """Jobs this buffer accounts for (for ``LocalProcess.reconcile``).

        Adopted claims count for ``grace`` seconds; older ones were never acked
        (Celery dropped them with the old connection) and are forgotten here.
        """
        known = {job_id for job_id, _ in self._started.values()}
        known |= {job_id for job_id, _ in list(self._to_finish) + list(self._to_mark)}
        known |= set(self._deferred)
        now = time.monotonic()
        for tag, (job_id, _, since) in list(self._adopted.items()):
            if now - since < grace:
                known.add(job_id)
            else:
                self._adopted.pop(tag, None)
        return known


def _drain(queue: collections.deque) -> list:
    """Pop everything from a deque other threads append to."""
    items = []
    try:
        while True:
            items.append(queue.popleft())
    except IndexError:
        return items
