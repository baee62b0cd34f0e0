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
from typing import Any, Optional

from celery.exceptions import Ignore

from . import interruption
from .cursor import HEADER, Progress
from .task import IterativeTask, _send_again

__all__ = ["run_to_completion", "Report", "ADAPTER"]

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


class _Interrupter:
    """Says stop after every ``stop_every`` items of a run."""

    def __init__(self, stop_every: Optional[int]) -> None:
        self.stop_every = stop_every
        self.asked = 0

    def new_run(self) -> None:
        self.asked = 0

    def __call__(self) -> Optional[str]:
        # Asked once per item, before processing it.
        self.asked += 1
        if self.stop_every is not None and self.asked > self.stop_every:
            return "testing"
        return None


def run_to_completion(task: IterativeTask, *args: Any, stop_every: Optional[int] = None,
                      task_id: Optional[str] = None, max_runs: int = 10_000, **kwargs: Any) -> Report:
    """Run ``task(*args, **kwargs)`` until it completes, stopping each run after ``stop_every`` items.

    Throttles and ``max_job_runtime`` apply as usual; countdowns are not waited for.
    """
    task_id = task_id or str(uuid.uuid4())
    interrupter = _Interrupter(stop_every)
    sent: list = []
    headers: dict = {}
    cursors: list = []
    previous = interruption._ADAPTERS.get(ADAPTER)
    interruption.register(ADAPTER, interrupter)
    adapters_before = task.__dict__.get("interruption_adapters")
    task.interruption_adapters = tuple(type(task).interruption_adapters) + (ADAPTER,)
    token = _send_again.set(sent.append)
    try:
        for run in range(1, max_runs + 1):
            interrupter.new_run()
            task.push_request(id=task_id, args=list(args), kwargs=dict(kwargs), headers=dict(headers),
                              delivery_info={}, is_eager=False, retries=0, **headers)
            try:
                result = task(*args, **kwargs)
            except Ignore:
                signature = sent.pop()
                headers = dict(signature.options.get("headers") or {})
                progress = Progress.from_json(headers[HEADER])
                cursors.append(progress.cursor)
                continue
            finally:
                task.pop_request()
            handed_on = Progress.from_json(headers.get(HEADER)) or Progress()
            # A completed run was asked once per item it processed.
            return Report(result=result, task_id=task_id, runs=run, times_interrupted=len(cursors),
                          iterations=handed_on.iterations + interrupter.asked, cursors=cursors)
        raise AssertionError(f"{task.name} did not complete in {max_runs} runs")
    finally:
        _send_again.reset(token)
        if adapters_before is None:
            del task.interruption_adapters
        else:
            task.interruption_adapters = adapters_before
        if previous is None:
            interruption.unregister(ADAPTER)
        else:
            interruption.register(ADAPTER, previous)
