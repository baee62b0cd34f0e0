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
and retried from the maintenance thread (``retry_deferred``) until it lands.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from typing import Callable

from sqlalchemy.exc import SQLAlchemyError

from . import stopping_pool
from .limits import worker as limit_worker
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
        # When the oldest of the writes queued above was queued (monotonic), None once a flush took them.
        self._queued_since: float | None = None
        # job id -> ("finish" | "mark" | "release" | "dead_letter", process id that claimed it): state
        # changes that failed because the database was away.
        self._deferred: dict[int, tuple[str, int | None]] = {}
        # job id -> (error class, error) of the deferred "dead_letter"s.
        self._dead_letters: dict[int, tuple[str, str]] = {}
        # delivery tag -> (job id, process id that claimed it) of early-acked
        # jobs still running.  Kept per process, not per channel: a channel
        # closed by a reconnect must not forget jobs still running in the pool.
        self._started: dict[str, tuple[int, int | None]] = {}
        #: delivery tag -> (job id, process id, since): claims of channels that
        #: closed while Celery may still run them (see ``Channel._restore``).
        self._adopted: dict[str, tuple[int, int, float]] = {}
        # Finishes on their way to the database (drained, not yet committed or
        # deferred), and the lock under which a job moves between these places:
        # ``reconcile`` must never find a job it holds in none of them.
        self._writing: set[int] = set()
        self._moving = threading.Lock()
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
        self._writes_waiting.set()   # (else the writer sleeps out its 1 s wait before it sees the stop)
        writer, self._writer = self._writer, None
        if writer is not None and writer is not threading.current_thread():
            writer.join(timeout=self.store.options.busy_timeout + 5)

    def _writer_loop(self) -> None:
        """Write acks the claim loop cannot, while it is away.

        Under prefork, Celery's main loop blocks inside a delivery while every
        pool process is busy (billiard's apply_async waits for a free one),
        possibly for as long as a task runs; and between claims it waits for
        enough acks to make the next claim worth a transaction.  Acks queued
        meanwhile are written here once the oldest has waited ``WRITE_DELAY``
        (so they still go in batches), unless the loop, back, has taken them
        with its next claim.
        """
        try:
            while not self._stop.is_set():
                if not self._writes_waiting.wait(1.0):
                    continue
                self._writes_waiting.clear()
                while self.has_pending_writes:
                    # (until the oldest has waited WRITE_DELAY: the loop, back, may take it with a claim)
                    if self._stop.wait(self.write_due_in(WRITE_DELAY) or WRITE_DELAY):
                        break
                    if self._loop_away and self.write_due_in(WRITE_DELAY) == 0:
                        with contextlib.suppress(SQLAlchemyError):   # logged and deferred by flush
                            self.flush()
        finally:
            self.store.close_own_connection()

    def _queued(self) -> None:
        """A write was queued: note since when writes wait, and wake the writer if the loop is away."""
        if self._queued_since is None:
            self._queued_since = time.monotonic()
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
            self._queued()
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
            # maintenance thread rather than leaving it claimed forever.
            log.warning("could not record job %s as finished (%s); retrying from the maintenance thread",
                        job_id, exc)
            self._deferred[job_id] = ("finish", process_id)
            return False
        if not done:
            self._log_claim_lost(job_id, process_id)
        else:
            limit_worker.finished(self.store, [job_id])   # (its Concurrency slot, if it holds one)
        return done

    def finish_later(self, job_id: int, process_id: int | None = None) -> None:
        """Queue a finish for the next ``flush`` (one transaction for many acks)."""
        self._to_finish.append((job_id, self._default(process_id)))
        self._queued()

    def finish_completed(self, running: set[str]) -> None:
        """Queue finishes for the early-acked jobs whose delivery tag is not in ``running``."""
        for tag in list(self._started):
            if tag not in running:
                with self._moving:   # (never in neither place for ``known_job_ids``)
                    entry = self._started.pop(tag, None)
                    if entry is not None:
                        self._to_finish.append(entry)
                        self._queued()

    def _log_claim_lost(self, job_id: int, process_id: int | None) -> None:
        if self.store.failed.failed_by_task(job_id=job_id):
            # Its task raised and the task's process kept it as failed (``task_failures``): nothing was lost.
            log.debug("job %s ended failed in its task: kept as a failed execution", job_id)
            return
        if stopping_pool.stopping():
            job = self.store.jobs.detail(job_id)
            if job is None or job["state"] == "finished":
                # Its pool process finished it while the worker stopped (``stopping_pool``).
                log.debug("job %s was already recorded finished by its pool process", job_id)
                return
        log.error("job %s finished in %s, but its claim (process id %s) had been taken away: the "
                  "process was pruned, and the pruner's decision (released or failed) stands",
                  job_id, self._name(), process_id)

    @property
    def has_pending_writes(self) -> bool:
        return bool(self._to_mark or self._to_finish)

    def write_due_in(self, delay: float) -> float:
        """Seconds until the oldest queued write will have waited ``delay`` (0: now, or nothing queued).

        Why: the hub writes acks that no claim carries ``WRITE_DELAY`` after
        they were queued (``eventloop``).  In a busy drain every claim carries
        the acks since the last one; a timer that wrote whatever was queued
        when it fired wrote a transaction of its own (a durable commit, and the
        hub blocked on it) for acks the next claim, a few milliseconds later,
        would have carried: one for every five claims of a MariaDB drain.
        """
        since = self._queued_since
        if since is None or not self.has_pending_writes:
            return 0.0
        return max(0.0, since + delay - time.monotonic())

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
        with self._moving:
            marks, finishes = _drain(self._to_mark), _drain(self._to_finish)
            self._queued_since = None
            writing = [job_id for job_id, _ in finishes]
            self._writing.update(writing)
        if not marks and not finishes and claim is None:
            return []
        try:
            return self._write(marks, finishes, claim)
        finally:
            with self._moving:
                self._writing.difference_update(writing)

    def _write(self, marks: list, finishes: list, claim: dict | None) -> list:
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
                            "maintenance thread", len(marks), len(finishes), exc)
            for job_id, process_id in marks:   # (a finish deferred for the same job supersedes its mark)
                self._deferred.setdefault(job_id, ("mark", process_id))
            for job_id, process_id in finishes:
                self._deferred[job_id] = ("finish", process_id)
            raise
        if marks or finishes:
            log.debug("recorded %d started and %d finished job(s)", len(marks), len(finishes))
        done = set(done)
        limit_worker.finished(self.store, done)   # Concurrency slots of those that hold one
        for job_id, process_id in finishes:
            if job_id not in done:
                self._log_claim_lost(job_id, process_id)
        return claimed

    # ------------------------------------------------------------------ releases and hand-overs

    def defer_release(self, job_id: int, process_id: int | None = None) -> None:
        """Remember a release that failed (database down) to retry from the maintenance thread."""
        self._deferred[job_id] = ("release", self._default(process_id))

    def retry_deferred(self) -> list[int]:
        """Retry the deferred state changes; returns the jobs failed here (deferred rejects)."""
        failed = []
        for job_id, (op, process_id) in list(self._deferred.items()):
            if process_id is None:
                self._deferred.pop(job_id, None)
            elif op == "finish":
                self._deferred.pop(job_id, None)
                self.finish(job_id, process_id)   # re-defers itself if the database is still away
            elif op == "mark":
                # A no-op if the job finished meanwhile (its claim is gone) or a pruner took it.
                self.store.claims.mark_acked(job_id=job_id, process_id=process_id, now=utcnow())
                if self._deferred.get(job_id, (None,))[0] == "mark":
                    self._deferred.pop(job_id, None)
            elif op == "dead_letter":
                error_class, error = self._dead_letters[job_id]
                if self.store.claims.fail(job_id=job_id, process_id=process_id, error_class=error_class,
                                          error=error, now=utcnow()):
                    failed.append(job_id)
                self._deferred.pop(job_id, None)
                self._dead_letters.pop(job_id, None)
            else:
                # Fenced like every release: a no-op if a pruner took the claim meanwhile.
                self.store.claims.release(job_id=job_id, process_id=process_id, now=utcnow())
                self._deferred.pop(job_id, None)
        return failed

    def dead_letter(self, job_id: int, process_id: int, error_class: str, error: str) -> bool:
        """A reject without requeue: claimed -> failed, fenced on the claim.

        If the database is away it is retried from the maintenance thread: a
        rejected job whose claim were left standing would be released by
        ``reconcile`` and run again.
        """
        try:
            return self.store.claims.fail(job_id=job_id, process_id=process_id, error_class=error_class,
                                          error=error, now=utcnow())
        except SQLAlchemyError as exc:
            log.warning("could not record job %s as rejected (%s); retrying from the maintenance thread", job_id, exc)
            self._dead_letters[job_id] = (error_class, error)
            self._deferred[job_id] = ("dead_letter", process_id)
            return False

    def adopt(self, tag: str, claim: Claim, may_have_run: bool = False) -> None:
        """Keep the claim of a closing channel's delivery that Celery may still run (and ack).

        ``may_have_run``: Celery may run it without ever acking it (see
        ``Channel._restore``), so it is recorded as started, like an early ack:
        if it is never acked, deregistration or a pruner fails it rather than
        running it a second time.
        """
        self._adopted[tag] = (*claim, time.monotonic())
        if may_have_run:
            log.warning("job %s was delivered before the connection was lost and may be running in the pool: "
                        "its claim is kept (and recorded as started) while %s lives", claim[0], self._name())
            self._to_mark.append(claim)
            self._queued()

    def take_adopted(self, tag: str) -> Claim | None:
        entry = self._adopted.pop(tag, None)
        return None if entry is None else entry[:2]

    def known_job_ids(self) -> set[int]:
        """Jobs this buffer accounts for (for ``LocalProcess.reconcile``).

        Adopted claims count for as long as this process lives, acked or not:
        a delivery Celery has dropped after a lost connection may still be
        running in a pool process (``AsynPool.flush`` discards jobs it has
        already written to one, and their acks with them), so no amount of
        waiting proves it never ran.  Deregistration settles them.
        """
        with self._moving:
            known = {job_id for job_id, _ in self._started.values()}
            known |= {job_id for job_id, _ in list(self._to_finish) + list(self._to_mark)}
            known |= self._writing
        known |= set(self._deferred)
        known |= {job_id for job_id, _, _ in list(self._adopted.values())}
        return known


def _drain(queue: collections.deque) -> list:
    """Pop everything from a deque other threads append to."""
    items = []
    try:
        while True:
            items.append(queue.popleft())
    except IndexError:
        return items
