"""A job the store fails reaches its Celery result: FAILURE, with the exception the store recorded.

Why: when the store fails a job (its worker was pruned after a kill -9, its
payload could not be decoded, it was released ``max_releases`` times, its
worker shut down cold, the consumer rejected it), no Celery code runs to
write its result.  Left alone, the result stays ``STARTED`` or ``PENDING``:
``AsyncResult.get()`` without a timeout waits forever, and a chord or chain
waiting on it never ends.

Who writes it: the process that failed the job in the store, which has the
app (a live worker's maintenance, channel or deregistration; ``celery sqlq
prune``), through the app's own result backend, whatever it is (ours, Redis,
``db+``...), and only after the store's transaction has committed: a result
never announces a failure the store rolled back.  The exception is the
class from :mod:`.errors` the failed row names, with the row's message, so
``get()`` raises e.g. ``ProcessPrunedError``.  Celery's ``mark_as_failure``
then does what it does for any failed task: a chord part counts as failed
(the chord fails), the tasks chained after it fail, its errbacks run.

A result already in a ready state (SUCCESS, FAILURE, REVOKED: the task
finished just before its worker died) is never overwritten, and nothing is
written for a task that ignores its result (as Celery's own worker would not).
"""
from __future__ import annotations

import base64
import json
import logging
from functools import partial
from typing import Any, Callable, Sequence

from celery import states
from celery.app.task import Context
from kombu.serialization import loads, prepare_accept_content

from .errors import STORE_DECISIONS
from .store import Store

log = logging.getLogger("celery_sqlbackend.failure_results")

#: ``report(job_ids)``: record the Celery results of jobs the store has just failed.
Reporter = Callable[[Sequence[int]], int]


def reporter(app: Any, store: Store) -> Reporter:
    """A ``Reporter`` writing through ``app``'s result backend."""
    return partial(record_failures, app, store)


def record_failures(app: Any, store: Store, job_ids: Sequence[int]) -> int:
    """Write FAILURE for the failed jobs ``job_ids`` (committed in ``store``); returns how many were written.

    Never raises: the store's decision stands whatever the result backend says;
    a backend that cannot be reached is logged.
    """
    if not job_ids or _backend_disabled(app):
        return 0
    try:
        failures = store.failed.messages(job_ids=job_ids)
    except Exception as exc:
        log.warning("could not read failed jobs %s to record their results (%s)", list(job_ids), exc)
        return 0
    written = 0
    for row in failures:
        try:
            written += _record(app, row)
        except Exception as exc:
            log.warning("could not record the failure of job %s (task %s) in the result backend: %s: %s",
                        row.job_id, row.task_id, exc.__class__.__name__, exc)
    return written


def _backend_disabled(app: Any) -> bool:
    from celery.backends.base import DisabledBackend
    return isinstance(app.backend, DisabledBackend)


def _record(app: Any, row: Any) -> int:
    cls = STORE_DECISIONS.get(row.error_class)
    if cls is None or not row.task_id:
        return 0      # a task's own exception: Celery wrote that result itself
    backend = app.backend
    request = request_of(row.payload, row.task_id, row.task_name, prepare_accept_content(app.conf.accept_content))
    task = app.tasks.get(row.task_name) if row.task_name else None
    if task is not None and _ignores_result(task, request):
        return 0
    if backend.get_state(row.task_id) in states.READY_STATES:
        return 0      # finished (or revoked) before the store failed it: the truth is already there
    message = row.error
    prefix = f"{cls.__name__}: "
    if message.startswith(prefix):
        message = message[len(prefix):]
    backend.mark_as_failure(row.task_id, cls(message), request=request)
    log.info("recorded %s for task %s (job %s) in the result backend", cls.__name__, row.task_id, row.job_id)
    return 1


def _ignores_result(task: Any, request: Context) -> bool:
    ignore = getattr(request, "ignore_result", None)
    if ignore is None:
        ignore = task.ignore_result
    return bool(ignore) and not task.store_errors_even_if_ignored


def request_of(payload: str, task_id: str, task_name: str | None, accept: set[str]) -> Context:
    """The task's request as a worker would have built it (headers, arguments, chord and chain links),
    or a bare one naming the task if the stored message cannot be read (or is of a content type
    outside ``accept``, the app's ``accept_content``: never unpickled here when the worker would not)."""
    bare = Context(id=task_id, task=task_name)
    try:
        message = json.loads(payload)
        headers = dict(message.get("headers") or {})
        props = message.get("properties") or {}
        body = message.get("body")
        if props.get("body_encoding") == "base64":
            body = base64.b64decode(body)
        decoded = loads(body, message.get("content-type"), message.get("content-encoding") or "utf-8",
                        accept=accept)
    except Exception:
        return bare
    if isinstance(decoded, (list, tuple)) and len(decoded) == 3:      # task message protocol 2
        args, kwargs, embed = decoded
        fields = {**headers, **(embed or {}), "args": args, "kwargs": kwargs}
    elif isinstance(decoded, dict):                                     # protocol 1: all in the body
        fields = {**headers, **decoded}
    else:
        return bare
    info = props.get("delivery_info") or {}
    fields.update(id=task_id, reply_to=props.get("reply_to"), correlation_id=props.get("correlation_id"),
                  delivery_info={"exchange": info.get("exchange"), "routing_key": info.get("routing_key"),
                                 "priority": props.get("priority"), "redelivered": True})
    try:
        return Context(fields)
    except Exception:
        return bare
