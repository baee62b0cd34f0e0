"""Unique jobs: ``@app.task(sqlq_unique="{0}", sqlq_unique_for=600)``.

``sqlq_unique`` is a ``str.format`` template (or a callable) applied to the
task's arguments: ``"{0}"``, ``"{account_id}"``, ``"{0}:{kind}"``.  The key is
the task name, a colon, and that text (hashed if longer than the column).
``sqlq_unique_for`` says how long a key is held:

* ``"queued"``   while the job waits (ready or scheduled): released when a worker claims it;
* ``"running"``  while it waits or runs: released when it finishes or fails (the default);
* seconds (a number or ``timedelta``): for that long after the enqueue, whatever becomes of the job.

Why here and not in the channel: the key comes from the task's arguments,
and the second enqueue should return the *first* job's ``AsyncResult``; only
``Task.apply_async`` sees both.  ``install`` wraps it once: a task without
``sqlq_unique`` goes straight through; one with it gets the key as message
headers (``sqlq_unique``, ``sqlq_unique_for``; ``send_task`` callers may set
these headers themselves), which the channel turns into a key row taken by
the database (``store.unique_keys``).  A key that cannot be formatted is an
error at enqueue, before anything is sent.  Off this transport, the headers
are ignored.
"""
from __future__ import annotations

import contextvars
import hashlib
import numbers
from datetime import datetime, timedelta
from typing import Any, Callable, Mapping

from .errors import ConfigurationError, SQLQError
from .limits import keys as limit_keys
from .store.unique_keys import CLAIMED, FINISHED, UniqueKey

HEADER_KEY = "sqlq_unique"
HEADER_FOR = "sqlq_unique_for"
#: ``sqlq_unique_for`` words and the ``held_until`` they store.
SCOPES = {"queued": CLAIMED, "running": FINISHED}
DEFAULT_SCOPE = "running"
KEY_LENGTH = 255


class UniqueKeyError(SQLQError, ValueError):
    """A task's ``sqlq_unique`` key cannot be made from the arguments of this call."""


#: Task id of a duplicate -> task id holding the key, for the ``apply_async`` in progress.
_DUPLICATES: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("sqlq_duplicates",
                                                                                   default=None)


def headers_for(task: Any, args: Any, kwargs: Any) -> dict[str, Any] | None:
    """The unique-key headers for a call of ``task``, or None if it has no ``sqlq_unique``."""
    template = getattr(task, HEADER_KEY, None)
    if template is None:
        return None
    scope = scope_value(getattr(task, HEADER_FOR, DEFAULT_SCOPE), task.name)
    args, kwargs = tuple(args or ()), dict(kwargs or {})
    try:
        text = template(*args, **kwargs) if callable(template) else str(template).format(*args, **kwargs)
    except (IndexError, KeyError, AttributeError, ValueError, TypeError) as exc:
        raise UniqueKeyError(
            f"task {task.name!r}: its sqlq_unique key {template!r} cannot be made from this call's "
            f"{len(args)} positional argument(s) and keyword(s) {sorted(kwargs)} "
            f"({exc.__class__.__name__}: {exc}); nothing was enqueued. Pass the arguments the key "
            "names, or change sqlq_unique ('{0}' is the first positional argument, '{name}' a keyword).") from None
    return {HEADER_KEY: key_text(task.name, str(text)), HEADER_FOR: scope}


def key_text(task_name: str, text: str) -> str:
    key = f"{task_name}:{text}"
    if len(key) <= KEY_LENGTH:
        return key
    digest = hashlib.sha256(key.encode()).hexdigest()
    return f"{task_name[:KEY_LENGTH - 72]}:sha256:{digest}"


def scope_value(scope: Any, task_name: str = "") -> str | float:
    """``sqlq_unique_for`` as a header value: "queued", "running", or seconds."""
    if isinstance(scope, timedelta):
        scope = scope.total_seconds()
    if isinstance(scope, str) and scope in SCOPES:
        return scope
    if isinstance(scope, numbers.Real) and not isinstance(scope, bool) and scope > 0:
        return float(scope)
    raise ConfigurationError(
        f"task {task_name!r}: sqlq_unique_for={scope!r} is not a scope; write 'queued' (while waiting), "
        "'running' (while waiting or running) or a number of seconds > 0")


def unique_key(headers: Mapping[str, Any], now: datetime) -> UniqueKey | None:
    """The key a published message carries in its headers, or None."""
    key = headers.get(HEADER_KEY)
    if not key:
        return None
    scope = scope_value(headers.get(HEADER_FOR, DEFAULT_SCOPE), str(headers.get("task")))
    if isinstance(scope, str):
        return UniqueKey(str(key)[:KEY_LENGTH], SCOPES[scope], None)
    return UniqueKey(str(key)[:KEY_LENGTH], None, now + timedelta(seconds=scope))


def report_duplicate(task_id: str | None, holder: str | None) -> None:
    """The channel found ``task_id``'s key held by ``holder``: tell the ``apply_async`` in progress."""
    sink = _DUPLICATES.get()
    if sink is not None and task_id and holder:
        sink[task_id] = holder


def _wrap(apply_async: Callable[..., Any]) -> Callable[..., Any]:
    def apply_async_unique(self, args=None, kwargs=None, *rest: Any, **options: Any):
        headers = None if getattr(self, HEADER_KEY, None) is None else headers_for(self, args, kwargs)
        # (``sqlq_limits`` travel the same way: ``limits.keys``)
        limits = None if getattr(self, limit_keys.OPTION, None) is None else limit_keys.headers_for(self, args, kwargs)
        if headers is None and limits is None:
            return apply_async(self, args, kwargs, *rest, **options)
        options["headers"] = {**(options.get("headers") or {}), **(headers or {}), **(limits or {})}
        sink: dict[str, str] = {}
        token = _DUPLICATES.set(sink)
        try:
            result = apply_async(self, args, kwargs, *rest, **options)
        finally:
            _DUPLICATES.reset(token)
        holder = sink.get(getattr(result, "id", None))
        return result if holder is None else self.AsyncResult(holder)

    apply_async_unique._sqlq_original = apply_async   # type: ignore[attr-defined]
    apply_async_unique.__doc__ = apply_async.__doc__
    return apply_async_unique


def install() -> None:
    """Wrap ``celery.app.task.Task.apply_async`` once (``import celery_sqlbackend`` calls it)."""
    from celery.app.task import Task
    if not hasattr(Task.apply_async, "_sqlq_original"):
        Task.apply_async = _wrap(Task.apply_async)
