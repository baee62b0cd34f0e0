"""Jobs a prefork pool process runs while its worker stops are finished by that process.

Why: at a warm shutdown Celery's consumer calls ``AsynPool.flush()`` before it
closes the connection.  ``flush`` discards from the pool's cache every job
whose "accepted" message the worker has not read yet, *including jobs already
written to a pool process*, counting on the broker to redeliver them.  The
pool process still runs them (the pool drains what it was sent), but their
acks are dropped: the channel sees an unacked delivery, and the worker would
give the job back to the queue at exit, where another worker runs it again.

So from the moment the worker starts stopping, a pool process records the
end of each task it runs itself (``task_postrun``), fenced on the claim the
delivery was made under, as ``task_failures`` does for failures.  The
worker's own finish of the same job, if its ack does arrive, then finds the
claim gone and the job finished, and says nothing (``AckBuffer``).  At exit
the worker gives back only what no pool process ran.

The "stopping" flag lives in one byte of shared memory created before the
pool forks (``arm``), so a pool process sees the worker's flag without a
round trip; it is set from Celery's ``worker_shutting_down`` signal (SIGTERM,
SIGINT) and by the channel when a stopping worker closes it (``celery control
shutdown`` sends no signal).
"""
from __future__ import annotations

import logging
import mmap
import os
from typing import Any

from .store import Store, utcnow
from .task_failures import delivered_claim

log = logging.getLogger("celery_sqlbackend.stopping_pool")

_flag: mmap.mmap | None = None
_owner_pid: int | None = None


def arm() -> None:
    """Create the shared flag (MainProcess, before the pool forks: every pool process inherits it)."""
    global _flag, _owner_pid
    if _flag is None or _owner_pid != os.getpid():
        _flag = mmap.mmap(-1, 1)    # anonymous and MAP_SHARED: one page every forked child shares
        _owner_pid = os.getpid()


def mark_stopping() -> None:
    """The worker began a warm shutdown: pool processes finish their tasks' jobs from now on."""
    if _flag is not None:
        _flag[0] = 1


def stopping() -> bool:
    return _flag is not None and _flag[0] == 1


def in_pool_process() -> bool:
    """A forked pool process of this worker (the threads and solo pools run tasks in the worker itself,
    whose acks are never dropped)."""
    return _owner_pid is not None and os.getpid() != _owner_pid


def finish_in_pool(store: Store, task: Any, task_id: str | None, state: str | None) -> bool:
    """``task_postrun`` in a pool process of a stopping worker: finish the task's job, fenced on its claim.

    A rejected task is left to the worker (a requeue releases the job), and a
    failed one was already kept as failed by ``task_failures`` (the claim is gone).
    """
    if not (stopping() and in_pool_process()) or state == "REJECTED":
        return False
    claim = delivered_claim(task.request)
    if claim is None:
        return False
    job_id, process_id, _ = claim
    try:
        done = store.claims.finish(job_id=job_id, process_id=process_id, now=utcnow(),
                                   keep=store.options.keep_finished > 0)
    except Exception as exc:    # the worker's own ack, or its exit, still settles the job
        log.warning("could not record task %s (job %s) as finished from its pool process: %s", task_id, job_id, exc)
        return False
    if done:
        log.debug("job %s finished by its pool process while the worker stops", job_id)
    return done
