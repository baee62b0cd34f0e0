"""Test helpers: run an IterativeTask to completion in-process, interrupting it on purpose.

No broker and no worker: each run is executed the way a worker executes it
(a request with the task id, arguments and message headers), and the message a
stopped run sends is captured and becomes the next run's request.  Use it to
check that ``each_iteration`` and the enumerator resume correctly::

    from checkpoint.testing import run_to_completion

    def test_backfill_resumes():
        report = run_to_completion(backfill, 42, stop_every=3)
        assert report.times_interrupted == report.runs - 1
        assert report.result == ...
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from celery.exceptions import Ignore, Retry

from . import interruption
from .cursor import HEADER, Progress
from .store import NullStore, store_for_app
from .task import IterativeTask, _send_again

__all__ = ["run_to_completion", "Report", "ADAPTER", "SimulatedCrash", "SimulatedFailure"]

#: Name of the adapter registered while :func:`run_to_completion` runs.
ADAPTER = "checkpoint.testing"


@dataclass
class Report:
    result: Any
    task_id: str
    runs: int
    times_interrupted: int
    iterations: int
    cursors: list = field(default_factory=list)  # the cursor each stopped run handed on
    crashes: int = 0  # runs ended by ``crash_at``
    retries: int = 0  # runs ended by a retry (``retry_at`` or the task's own)


class SimulatedCrash(BaseException):
    """Raised inside a run to stand for SIGKILL/OOM: nothing after it is saved (see ``crash_at``)."""


class SimulatedFailure(Exception):
    """What a run raises at an item listed in ``retry_at``, before it retries."""


class _Interrupter:
    """Says stop after every ``stop_every`` items of a run; crashes or retries at chosen items of the job."""

    def __init__(self, task: IterativeTask, stop_every: Optional[int], crash_at: Iterable[int],
                 retry_at: Iterable[int], store: "_CrashableStore | None") -> None:
        self.task = task
        self.stop_every = stop_every
        self.crash_at = set(crash_at)
        self.retry_at = set(retry_at)
        self.store = store
        self.asked = 0

    def new_run(self) -> None:
        self.asked = 0

    def __call__(self) -> Optional[str]:
        # Asked once per item, before processing it.
        self.asked += 1
        done = self.task.progress.iterations if self.task.progress is not None else 0
        if done in self.crash_at:
            self.crash_at.discard(done)
            if self.store is not None:
                self.store.crashing = True  # a killed process saves nothing on its way out
            raise SimulatedCrash(f"simulated crash before item {done}")
        if done in self.retry_at:
            self.retry_at.discard(done)
            raise self.task.retry(exc=SimulatedFailure(f"simulated failure at item {done}"), countdown=0)
        if self.stop_every is not None and self.asked > self.stop_every:
            return "testing"
        return None


class _CrashableStore:
    """The task's durable store, deaf while a simulated crash unwinds."""

    durable = True

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.crashing = False

    def get(self, task_id: str) -> Optional[Progress]:
        return self.inner.get(task_id)

    def put(self, task_id: str, progress: Progress, **meta: Any) -> None:
        if not self.crashing:
            self.inner.put(task_id, progress, **meta)

    def delete(self, task_id: str) -> None:
        if not self.crashing:
            self.inner.delete(task_id)


def run_to_completion(task: IterativeTask, *args: Any, stop_every: Optional[int] = None,
                      crash_at: Iterable[int] = (), retry_at: Iterable[int] = (),
                      task_id: Optional[str] = None, max_runs: int = 10_000, **kwargs: Any) -> Report:
    """Run ``task(*args, **kwargs)`` until it completes, stopping each run after ``stop_every`` items.

    ``crash_at``: job-wide item numbers (items done so far) before which a run
    dies as if SIGKILLed: nothing is saved on the way out, and the same
    message is delivered again, so the job resumes from its last durable
    checkpoint (or from its message without a durable store), repeating the
    items in between, as a worker would.  ``retry_at``: item numbers at which
    the run fails and retries (``self.retry``); the retry resumes at that item.
    Each listed item fires once.  Throttles and ``max_job_runtime`` apply as
    usual; countdowns are not waited for.
    """
    task = task._get_current_object() if hasattr(task, "_get_current_object") else task  # a Celery proxy
    task_id = task_id or str(uuid.uuid4())
    store = task.cursor_store if task.cursor_store is not None else store_for_app(task.app)
    crashable = None if isinstance(store, NullStore) else _CrashableStore(store)
    interrupter = _Interrupter(task, stop_every, crash_at, retry_at, crashable)
    sent: list = []
    headers: dict = {}
    cursors: list = []
    retries = crashes = 0
    previous = interruption._ADAPTERS.get(ADAPTER)
    interruption.register(ADAPTER, interrupter)
    adapters_before = task.__dict__.get("interruption_adapters")
    store_before = task.__dict__.get("cursor_store")
    task.interruption_adapters = tuple(type(task).interruption_adapters) + (ADAPTER,)
    if crashable is not None:
        task.cursor_store = crashable
    token = _send_again.set(sent.append)
    try:
        for run in range(1, max_runs + 1):
            interrupter.new_run()
            task.push_request(id=task_id, args=list(args), kwargs=dict(kwargs), headers=dict(headers),
                              delivery_info={}, is_eager=False, called_directly=False, retries=retries, **headers)
            final: Optional[Progress] = None
            try:
                # run(), not __call__: __call__ pushes a request of its own, and its progress goes with it.
                result = task.run(*args, **kwargs)
                final = task.progress
            except SimulatedCrash:
                crashes += 1
                if crashable is not None:
                    crashable.crashing = False
                continue  # the same message again, as after a redelivery
            except Retry as exc:
                retries += 1
                sent.clear()
                headers = dict(exc.sig.options.get("headers") or {})
                continue
            except Ignore:
                signature = sent.pop()
                headers = dict(signature.options.get("headers") or {})
                progress = Progress.from_json(headers[HEADER])
                cursors.append(progress.cursor)
                continue
            finally:
                task.pop_request()
            return Report(result=result, task_id=task_id, runs=run, times_interrupted=len(cursors),
                          iterations=final.iterations if final is not None else 0, cursors=cursors,
                          crashes=crashes, retries=retries)
        raise AssertionError(f"{task.name} did not complete in {max_runs} runs")
    finally:
        _send_again.reset(token)
        if adapters_before is None:
            del task.interruption_adapters
        else:
            task.interruption_adapters = adapters_before
        if crashable is not None:
            if store_before is None:
                del task.cursor_store
            else:
                task.cursor_store = store_before
        if previous is None:
            interruption.unregister(ADAPTER)
        else:
            interruption.register(ADAPTER, previous)
