"""A pool process never starts a delivery whose claim a pruner has taken back.

Why: a worker frozen past ``alive_threshold`` (SIGSTOP, a suspended VM, a
long GC pause) is pruned by the live ones: the jobs it had prefetched but not
started go back to the queue, and another worker runs them.  When the frozen
worker wakes, those deliveries are still in its hands (Celery's reserved
requests, AsynPool's outbound buffer, even a job written to a pool process's
pipe just before the freeze), and Celery would start them: the job would run
twice.  Fencing already stops the frozen worker from *recording* anything for
them; this stops it from *running* them.

Where: in the pool process, just before the task's code runs, by wrapping
the tracer Celery builds for each task there (``task.__trace__``, built in
``celery.concurrency.prefork.process_initializer`` before it sends
``worker_process_init``).  Every path a delivery takes to a pool process ends
there, whichever buffer it waited in; a ``task_prerun`` receiver cannot stop a
task (Celery logs and ignores its exceptions).

When: each delivery carries the wall-clock time it was claimed
(``messages.for_delivery``).  A pruner takes a claim back only after the
claiming process's last heartbeat is ``alive_threshold`` old, and that beat
was at most a heartbeat interval before the claim; so a delivery that starts
within half the threshold of its claim cannot have been taken back, and runs
with no query.  An older one (a freeze, or a long wait behind other tasks)
is checked with one read: is it still claimed under the process id it was
delivered with (a pruned process registers afresh under a new id)?  If not,
the task is not run: the tracer reports Celery's ``Ignore``, so the worker
acks the delivery (a fenced write that records nothing) and writes no result.
If the read itself fails, the task runs, as it would have without this check.

On by default; ``check_stale_deliveries=False`` turns it off: the tracers are
left alone.

Scope: the prefork pool (Celery's default), where tracers are built per pool
process.  The threads, solo, gevent and eventlet pools start tasks in the
worker's own process, which the claim round already stops from claiming while
its heartbeats lag (``LocalProcess.may_claim``); what they hold at a freeze
can still start after it.
"""
from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable

from celery import states
from celery.app.trace import TraceInfo, trace_ok_t
from celery.exceptions import Ignore
from billiard.einfo import ExceptionInfo

from .messages import delivered_claim
from .store import Store

log = logging.getLogger("celery_sqlbackend.stale_deliveries")


def lost(threshold: float, store: Callable[[], Store], request: dict) -> tuple[int, int] | None:
    """The (job id, process id) of a delivery whose claim no longer stands; None: run it.
    ``store`` is called only when a delivery is old enough to need the check."""
    claim = delivered_claim(request.get("properties"))
    if claim is None or claim.claimed_at is None:
        return None
    job_id, process_id, claimed_at = claim
    if time.time() - claimed_at < threshold / 2:
        return None
    try:
        held = store().claims.holds(job_id=job_id, process_id=process_id)
    except Exception as exc:
        log.warning("could not check the claim of job %s before starting it (%s); starting it", job_id, exc)
        return None
    return None if held else (job_id, process_id)


def guarded(threshold: float, store: Callable[[], Store], name: str, trace: Callable[..., Any]) -> Callable[..., Any]:
    """``trace`` (a task's Celery tracer) that first drops a delivery whose claim was taken back."""
    @functools.wraps(trace)
    def guarded_trace(uuid: str, args: Any, kwargs: Any, request: dict | None = None) -> Any:
        gone = lost(threshold, store, request or {})
        if gone is None:
            return trace(uuid, args, kwargs, request)
        job_id, process_id = gone
        reason = (f"task {name}[{uuid}] (job {job_id}) not started: its claim under process id {process_id} was "
                  "taken back while this worker was not heartbeating (frozen?), and the job went back to the queue")
        log.warning("%s", reason)
        try:
            raise Ignore(reason)
        except Ignore as exc:
            return trace_ok_t(ExceptionInfo(internal=True), TraceInfo(states.IGNORED, exc), 0.0, None)
    guarded_trace.sqlq_guarded = True
    return guarded_trace


def guard_tracers(app: Any, threshold: float, store: Callable[[], Store]) -> int:
    """Wrap the tracer of every task of ``app`` built in this pool process; returns how many.

    ``store`` gives the broker's store when a check needs it: a pool process that never meets an
    old delivery never touches it.  (Opening it in every pool process as it starts made warm
    shutdowns stall on SQLite in the test suite, so it is looked up only when needed.)"""
    wrapped = 0
    for name, task in list(app.tasks.items()):
        trace = getattr(task, "__trace__", None)
        if trace is None or getattr(trace, "sqlq_guarded", False):
            continue
        task.__trace__ = guarded(threshold, store, name, trace)
        wrapped += 1
    return wrapped
