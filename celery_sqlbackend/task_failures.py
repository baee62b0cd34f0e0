"""A task's final failure is kept as a failed execution, where operators retry or discard it.

Why: in Solid Queue every job that failed is kept as a failed execution; with
a plain broker a task that raised is acked and gone, and only its result says
what happened.  Here a task that raised with no retries left (Celery's
``task_failure`` signal, which a retry does not send) moves its job from
claimed to failed with the exception's class, message and traceback, so
``celery sqlq failed list`` shows it and ``failed retry`` runs it again under
the same task id.  ``record_task_failures=False`` turns it off: the job is then
finished like any other.

Who writes it: the process that ran the task (a prefork child, or the worker
itself with the threads and solo pools), in one short transaction fenced on
the claim its delivery was made under (``delivery_info`` carries the job and
process ids): if a pruner took the job meanwhile, its decision stands and
nothing is written here.  The worker's own finish of that job then finds the
claim gone and, seeing the failed row, says nothing (``AckBuffer``).
"""
from __future__ import annotations

import logging
from typing import Any

from .messages import DeliveredClaim
from .messages import delivered_claim as read_claim
from .store import Store, utcnow

log = logging.getLogger("celery_sqlbackend.task_failures")

#: Longest error text kept (message and traceback): a runaway traceback must not bloat the table.
MAX_ERROR_CHARS = 65_536


def delivered_claim(request: Any) -> DeliveredClaim | None:
    """The claim a task's request was delivered under (``messages.delivered_claim``), or None."""
    return read_claim(getattr(request, "properties", None))


def record(store: Store, task: Any, task_id: str | None, exception: BaseException, einfo: Any) -> bool:
    """Move the failed task's job from claimed to failed (``lifecycle`` calls it on ``task_failure``)."""
    claim = delivered_claim(task.request)
    if claim is None or not store.options.record_task_failures:
        return False
    job_id, process_id, _ = claim
    kind = type(exception).__name__
    trace = getattr(einfo, "traceback", None) or ""
    error = f"{kind}: {exception}\n\n{trace}".rstrip()
    if len(error) > MAX_ERROR_CHARS:
        error = error[:MAX_ERROR_CHARS] + "\n… (cut)"
    try:
        kept = store.claims.fail(job_id=job_id, process_id=process_id, error_class=kind[:255], error=error,
                                 now=utcnow())
    except Exception as exc:    # never turn a task's failure into a worker's
        log.warning("could not record the failure of task %s (job %s) as a failed execution: %s",
                    task_id, job_id, exc)
        return False
    if kept:
        log.info("task %s (job %s) failed with %s: kept as a failed execution (celery sqlq failed)",
                 task_id, job_id, kind)
    return kept
