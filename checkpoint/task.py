"""IterativeTask: a Celery task that walks an enumerator and can stop anywhere.

The user writes two methods::

    class Backfill(IterativeTask):
        def build_enumerator(self, account_id, *, cursor=None):
            return self.enumerate.integers(0, 10_000, cursor=cursor)

        def each_iteration(self, item, account_id):
            ...

Between iterations the task asks its interruption adapters (the worker is
stopping), its ``max_job_runtime`` and its throttles whether to stop.  When
one says so, it sends itself again — same task id, same arguments, with its
:class:`~checkpoint.cursor.Progress` in a message header — and ends with
:class:`celery.exceptions.Ignore`, so no state is stored and
``AsyncResult(id).get()`` keeps waiting for the run that finishes.  An
interruption is not a retry: ``request.retries`` is carried unchanged and
``max_retries`` never applies.

The cursor is also saved durably every ``checkpoint_every`` iterations or
``checkpoint_interval`` seconds (see :mod:`checkpoint.store`), so a run that
is killed outright resumes from there when its message comes back.
"""
from __future__ import annotations

import contextvars
import inspect
import logging
import time
from typing import Any, Callable, Iterable, Optional

from celery import Task
from celery.exceptions import Ignore, Retry

from . import interruption, limits, revocation
from .cursor import HEADER, Progress, validate_cursor
from .enumerators import Enumerators
from .integration import install
from .partition import PARTITION_KWARG, WHOLE, Partition
from .store import Checkpointer, CursorStore, store_for_app
from .throttling import THROTTLE_MARK

__all__ = ["IterativeTask"]

logger = logging.getLogger("checkpoint")


#: Where a stopped run sends itself; ``None`` means the broker.  Set only by
#: :mod:`checkpoint.testing`, which runs jobs to completion in-process.
_send_again: contextvars.ContextVar = contextvars.ContextVar("checkpoint_send_again", default=None)


class _Stop(Exception):
    """Internal: leave the iteration loop with a reason and a backoff."""

    def __init__(self, reason: str, backoff: float = 0.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.backoff = backoff


class IterativeTask(Task):
    """Base class for resumable iterative tasks.

    Class attributes:
        max_job_runtime: seconds a single run may iterate before it re-enqueues
            itself.  ``None`` (default): 5 minutes, or half the broker's
            visibility timeout if shorter; ``math.inf``: no limit.  App conf
            ``checkpoint_max_job_runtime`` caps it for every task (see
            :mod:`checkpoint.limits`).
        interruption_adapters: names in the adapter registry to consult.
        checkpoint_every / checkpoint_interval: durable save cadence
            (iterations / seconds), whichever comes first.
        cursor_store: a :class:`~checkpoint.store.CursorStore`; by default the
            app's (``checkpoint_store_url``, or the database of an ``sqlq+`` broker).
        acks_late: True by default: a message acknowledged only when the run
            ends comes back if the worker is killed (our transport releases the
            claims of a pruned worker; AMQP/Redis redeliver), and the new run
            resumes from the last durable checkpoint.  Early-acked jobs whose
            worker dies are lost or failed, cursor or not.
        reject_on_worker_lost: True by default: a pool child killed outright
            (OOM, SIGKILL) gives the message back instead of failing the job,
            and the next run resumes from the last durable checkpoint.
        interruption_backoff: countdown (seconds) of the re-enqueue when an
            adapter says stop.  Not zero: with polling transports Celery's
            synchronous consumer loop goes on draining for up to 2 s after a
            warm shutdown begins (``drain_events(timeout=2.0)``) and runs what
            it received, so an immediately visible message bounces through
            the stopping worker (observed: two extra empty runs).  A restarted
            worker takes longer than this to boot anyway.
            ``max_job_runtime`` re-enqueues without delay.
    """

    #: What :func:`checkpoint.housekeeping.iterative_tasks` recognises iterative tasks by.
    checkpoint_iterative = True

    acks_late = True
    reject_on_worker_lost = True
    max_job_runtime: Optional[float] = None
    interruption_adapters: tuple = ("celery",)
    checkpoint_every: int = 100
    checkpoint_interval: float = 5.0
    cursor_store: Optional[CursorStore] = None
    interruption_backoff: float = 3.0
    enumerator_bind: Any = None
    _throttles: tuple = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _check_build_enumerator(cls)
        declared = tuple((method, backoff) for method, backoff in
                         ((value, getattr(value, THROTTLE_MARK, None)) for value in cls.__dict__.values())
                         if backoff is not None)
        if declared:
            cls._throttles = tuple(cls._throttles) + declared

    # -- user hooks ------------------------------------------------------

    def build_enumerator(self, *args: Any, cursor: Any = None, **kwargs: Any) -> Iterable[tuple]:
        """Return an iterable of ``(item, cursor)`` pairs starting after ``cursor``."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_enumerator(..., cursor=None)")

    def each_iteration(self, item: Any, *args: Any, **kwargs: Any) -> None:
        """Process one item.  Must be idempotent: after a crash it may run again."""
        raise NotImplementedError(f"{type(self).__name__} must implement each_iteration(item, ...)")

    def on_start(self, *args: Any, **kwargs: Any) -> None:
        """Called when a run starts with no saved progress: normally once per job.

        (A run killed before its first durable checkpoint starts again from
        scratch, and calls this again.)
        """

    def on_resume(self, *args: Any, **kwargs: Any) -> None:
        """Called at the start of every later run (after an interruption or a crash)."""

    def on_shutdown(self, *args: Any, **kwargs: Any) -> None:
        """Called at the end of every run, completed or interrupted, before any re-enqueue."""

    def on_complete(self, *args: Any, **kwargs: Any) -> Any:
        """Called when the enumerator is exhausted; its return value is the task's result."""
        return None

    # -- sugar -------------------------------------------------------------

    @property
    def enumerate(self) -> Enumerators:
        """The enumerator builders (see :mod:`checkpoint.enumerators`)."""
        return Enumerators(self)

    @property
    def progress(self) -> Optional[Progress]:
        """The running job's progress (cursor, counters); ``None`` outside a run."""
        return getattr(self.request, "checkpoint_progress", None)

    @property
    def partition(self) -> Partition:
        """This run's share of a job split with :func:`checkpoint.partition.in_partitions` (else the whole)."""
        return getattr(self.request, "checkpoint_partition", None) or WHOLE

    @classmethod
    def throttle_on(cls, condition: Callable[..., bool], backoff: float = 30.0) -> Callable[..., bool]:
        """Pause the job while ``condition`` holds: it re-enqueues itself ``backoff`` seconds later.

        ``condition`` is called before each item, with the task or with no
        argument; a true result ends the run (reason ``"throttled"``).
        Applies to the class it is called on and its subclasses::

            Backfill.throttle_on(lambda: replica_lag() > 5, backoff=60)

        In the class body, decorate a method with :func:`checkpoint.throttle_on` instead.
        """
        cls._throttles = tuple(cls._throttles) + ((condition, float(backoff)),)
        return condition

    @classmethod
    def on_bound(cls, app: Any) -> None:
        # Every app that runs iterative tasks must set the stop flag on shutdown.
        install(app)

    # -- the loop ----------------------------------------------------------

    def run(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        initial_cursor = kwargs.pop("cursor", None)
        partition = Partition.from_message(kwargs.pop(PARTITION_KWARG, None))
        request.checkpoint_partition = partition
        store = self._store()
        progress, resumed, stored_state = self._load_progress(request, initial_cursor, store)
        request.checkpoint_progress = progress
        saver = Checkpointer(store, request.id, progress, every=self.checkpoint_every,
                             interval=self.checkpoint_interval, task_name=self.name)
        request.checkpoint_saver = saver
        if stored_state == "done":
            # A redelivered copy of a job that completed (a broker's visibility
            # timeout, a lost ack): its work is done and its result stored.
            logger.warning("checkpoint: %s[%s] already completed; ignoring this delivery", self.name, request.id,
                           extra={"action": "duplicate_ignored", "task_id": request.id})
            raise Ignore()
        if stored_state == "revoked" or (request.id and not request.is_eager and revocation.is_revoked(request.id)):
            self._end_revoked(request, saver)
        if not request.is_eager:
            self._hand_back_if_stopping(request, args, kwargs, progress, initial_cursor)
        run_started = time.monotonic()

        if resumed:
            logger.info("checkpoint: %s[%s] resumed at cursor %r", self.name, request.id, progress.cursor,
                        extra={"action": "resumed", "task_id": request.id, "cursor": progress.cursor})
            self.on_resume(*args, **kwargs)
        else:
            self.on_start(*args, **kwargs)

        try:
            enumerator = self.build_enumerator(*args, cursor=progress.cursor, **kwargs)
            if enumerator is None:
                raise TypeError(f"{self.name}.build_enumerator returned None; return an iterable of (item, cursor)")
            self._measure(enumerator, progress, saver)
            saver.save()  # the row says "running" (and a missing table or grant fails here, clearly)
            iterator = iter(enumerator)
        except Exception as exc:
            saver.save_quietly("failed", error=_describe(exc))
            raise
        try:
            self._iterate(iterator, progress, run_started, saver, args, kwargs)
        except _Stop as stop:
            progress.total_time += time.monotonic() - run_started
            self.on_shutdown(*args, **kwargs)
            if stop.reason == "revoked":
                self._end_revoked(request, saver)
            self._reenqueue(request, args, kwargs, progress, stop, initial_cursor, saver)
        except Retry:
            raise  # self.retry() inside an iteration: retry() saved the progress
        except Exception as exc:
            # Keep what was done: a retry (or a redelivery) resumes from here.
            progress.total_time += time.monotonic() - run_started
            saver.save_quietly("failed", error=_describe(exc))
            raise
        except BaseException:
            progress.total_time += time.monotonic() - run_started
            saver.save_quietly()
            raise
        finally:
            _close(iterator)

        progress.total_time += time.monotonic() - run_started
        self.on_shutdown(*args, **kwargs)
        result = self.on_complete(*args, **kwargs)
        # Kept (state "done") until checkpoint_expires, so a redelivered copy does nothing.
        saver.save_quietly("done")
        logger.info("checkpoint: %s[%s] completed after %d iterations, %d interruptions, %.2fs",
                    self.name, request.id, progress.iterations, progress.times_interrupted, progress.total_time,
                    extra={"action": "completed", "task_id": request.id})
        return result

    def _measure(self, enumerator: Any, progress: Progress, saver: Checkpointer) -> None:
        """Learn the job's total (once per job) and how the enumerator measures progress."""
        saver.fraction = getattr(enumerator, "fraction", None)
        count = getattr(enumerator, "total_items", None)
        if progress.total is None and count is not None and saver.enabled:
            try:
                progress.total = count()
            except Exception as exc:  # a progress figure must never fail the job
                logger.warning("checkpoint: %s could not count its items: %s", self.name, _describe(exc))

    def _iterate(self, iterator: Any, progress: Progress, run_started: float, saver: Checkpointer,
                 args: tuple, kwargs: dict) -> None:
        eager = bool(self.request.is_eager)
        task_id = self.request.id
        max_runtime = self._max_job_runtime()
        done_this_run = 0
        for pair in iterator:
            # The next item is fetched *before* deciding to stop, so a job whose
            # last item is done completes instead of re-enqueueing an empty run.
            if not eager:
                # A run always makes progress before max_job_runtime can end it:
                # a slow build_enumerator must not re-enqueue forever.
                self._check_stop(task_id, run_started, max_runtime if done_this_run else None)
            item, cursor = _pair(pair, self.name)
            self.each_iteration(item, *args, **kwargs)
            progress.cursor = cursor
            progress.iterations += 1
            saver.after_iteration()
            done_this_run += 1

    def _check_stop(self, task_id: Optional[str], run_started: float, max_runtime: Optional[float]) -> None:
        if task_id and revocation.is_revoked(task_id):
            raise _Stop("revoked")
        for condition, backoff in self._throttles:
            if _call_condition(condition, self):
                raise _Stop("throttled", backoff)
        if max_runtime is not None and time.monotonic() - run_started > max_runtime:
            raise _Stop("max_job_runtime_exceeded", 0.0)
        for name in self.interruption_adapters:
            answer = interruption.lookup(name)()
            if answer:
                raise _Stop(answer if isinstance(answer, str) else "interrupted", self.interruption_backoff)

    def _max_job_runtime(self) -> Optional[float]:
        return limits.max_job_runtime(self.app, self.max_job_runtime)

    # -- progress in and out -------------------------------------------------

    def _load_progress(self, request: Any, initial_cursor: Any,
                       store: CursorStore) -> tuple[Progress, bool, Optional[str]]:
        header = getattr(request, HEADER, None) or (request.headers or {}).get(HEADER)
        from_message = Progress.from_json(header)
        from_store = store.get(request.id) if request.id else None
        stored_state = from_store.state if from_store is not None else None
        progress = Progress.newest(from_message, from_store)
        if progress is None:
            return Progress(cursor=validate_cursor(initial_cursor)), False, None
        if progress.total is None and from_store is not None:
            progress.total = from_store.total
        progress.state = None
        return progress, True, stored_state

    def signature_from_request(self, request: Any = None, args: Any = None, kwargs: Any = None,
                               queue: Any = None, **extra_options: Any) -> Any:
        """Every message this run sends for itself (re-enqueue, retry) carries its progress.

        That is how a retry resumes at the item that failed on any broker,
        with or without a durable store.
        """
        request = self.request if request is None else request
        progress = getattr(request, "checkpoint_progress", None)
        if progress is not None:
            validate_cursor(progress.cursor)
            headers = dict(extra_options.get("headers") or getattr(request, "headers", None) or {})
            headers[HEADER] = progress.to_json()
            extra_options["headers"] = headers
        signature = super().signature_from_request(request, args, kwargs, queue, **extra_options)
        send = _send_again.get()
        if send is not None:  # checkpoint.testing: a retry's message is captured, not sent
            signature.apply_async = lambda *a, **kw: send(signature)
        return signature

    def retry(self, *args: Any, **kwargs: Any) -> Any:
        """Celery's retry; the retry message resumes at the item that failed (see signature_from_request)."""
        try:
            return super().retry(*args, **kwargs)
        except Retry:
            saver = getattr(self.request, "checkpoint_saver", None)
            if saver is not None:
                saver.save_quietly("retrying")
            raise

    def _end_revoked(self, request: Any, saver: Checkpointer) -> None:
        """Stop for good: no re-enqueue, state REVOKED, the durable row says so."""
        saver.save_quietly("revoked")
        store_result = self.store_errors_even_if_ignored or not self.ignore_result
        try:
            self.backend.mark_as_revoked(request.id, "revoked", request=request, store_result=store_result)
        except Exception as exc:
            logger.warning("checkpoint: could not store the REVOKED state of %s: %s", request.id, _describe(exc))
        progress = saver.progress
        logger.info("checkpoint: %s[%s] revoked at cursor %r after %d iterations; not re-enqueued",
                    self.name, request.id, progress.cursor, progress.iterations,
                    extra={"action": "revoked", "task_id": request.id, "cursor": progress.cursor})
        raise Ignore()

    def _reenqueue(self, request: Any, args: tuple, kwargs: dict, progress: Progress, stop: _Stop,
                   initial_cursor: Any, saver: Checkpointer) -> None:
        validate_cursor(progress.cursor)
        progress.times_interrupted += 1
        if getattr(request, "checkpoint_reenqueued", False):  # pragma: no cover - defensive
            raise RuntimeError("checkpoint: refusing to re-enqueue the same run twice")
        request.checkpoint_reenqueued = True
        saver.save("interrupted")
        kwargs = _message_kwargs(request, kwargs, initial_cursor)
        options: dict[str, Any] = {"expires": None}
        if stop.backoff:
            options["countdown"] = stop.backoff
        # Not self.retry(): that bumps request.retries and applies max_retries.
        # `expires` is dropped: an absolute expiry would revoke a job that was
        # merely interrupted.  The progress header is added by signature_from_request.
        signature = self.signature_from_request(request, args, kwargs, **options)
        send = _send_again.get()
        if send is None:
            signature.apply_async()
        else:
            send(signature)
        logger.info("checkpoint: %s[%s] interrupted (%s) at cursor %r after %d iterations; re-enqueued",
                    self.name, request.id, stop.reason, progress.cursor, progress.iterations,
                    extra={"action": "interrupted", "task_id": request.id, "reason": stop.reason,
                           "cursor": progress.cursor, "times_interrupted": progress.times_interrupted})
        raise Ignore()

    def _hand_back_if_stopping(self, request: Any, args: tuple, kwargs: dict, progress: Progress,
                               initial_cursor: Any) -> None:
        """A job received while the worker is already stopping (a solo or threads worker
        drains its prefetched messages after TERM) is sent back before it starts: no
        hooks, no enumerator built, no interruption counted, its row untouched."""
        if "celery" not in self.interruption_adapters or not interruption.stopping():
            return
        kwargs = _message_kwargs(request, kwargs, initial_cursor)
        options: dict[str, Any] = {"expires": None}
        if self.interruption_backoff:
            options["countdown"] = self.interruption_backoff
        request.checkpoint_progress = progress if progress.iterations or progress.cursor is not None else None
        signature = self.signature_from_request(request, args, kwargs, **options)
        send = _send_again.get()
        if send is None:
            signature.apply_async()
        else:
            send(signature)
        logger.info("checkpoint: %s[%s] not started: the worker is stopping; handed back", self.name, request.id,
                    extra={"action": "handed_back", "task_id": request.id})
        raise Ignore()

    def _store(self) -> CursorStore:
        store = self.cursor_store
        if store is None:
            store = store_for_app(self.app)
        return store


def _message_kwargs(request: Any, kwargs: dict, initial_cursor: Any) -> dict:
    """The keyword arguments a run sends itself again with: its own, plus what run() took out."""
    if initial_cursor is not None:
        kwargs = {**kwargs, "cursor": initial_cursor}
    partition = getattr(request, "checkpoint_partition", None)
    if partition is not None:
        kwargs = {**kwargs, PARTITION_KWARG: partition.to_message()}
    return kwargs


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _pair(pair: Any, task_name: str) -> tuple:
    if isinstance(pair, tuple) and len(pair) == 2:
        return pair
    raise TypeError(f"{task_name}.build_enumerator must yield (item, cursor) pairs, got {pair!r}; "
                    "wrap plain iterables, e.g. self.enumerate.sequence(items, cursor=cursor)")


def _check_build_enumerator(cls: type) -> None:
    """A build_enumerator that cannot take ``cursor=`` is an error when the class is defined."""
    method = cls.__dict__.get("build_enumerator")
    if method is not None:
        check_takes_cursor(method, f"{cls.__qualname__}.build_enumerator",
                           "def build_enumerator(self, ..., *, cursor=None)")


def check_takes_cursor(function: Callable[..., Any], shown: str, example: str) -> None:
    """Raise TypeError unless ``function`` accepts a ``cursor`` keyword argument."""
    try:
        params = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return
    if "cursor" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    raise TypeError(f"{shown} must accept a `cursor` keyword argument "
                    f"(the position to resume after; None on the first run): {example}")


def _call_condition(condition: Callable[..., bool], task: IterativeTask) -> bool:
    try:
        params = inspect.signature(condition).parameters
    except (TypeError, ValueError):
        params = {"task": None}
    return bool(condition(task) if params else condition())


def _close(iterator: Any) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        close()
