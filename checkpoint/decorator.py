"""``@iterative_task(enumerator=...)``: an iterative task written the way Celery tasks are.

Why: Celery users write tasks as decorated functions, and Django projects
rely on ``@shared_task`` so that ``app.autodiscover_tasks()`` registers them
on whichever app is current.  ``app.register_task(Backfill())`` does neither.
The decorated function is ``each_iteration`` (it receives the item, then the
job's arguments); ``enumerator`` is ``build_enumerator`` (it receives the
task, the job's arguments and ``cursor=``)::

    from checkpoint import iterative_task

    @iterative_task(enumerator=lambda task, account_id, *, cursor=None:
                    task.enumerate.integers(0, 10_000, cursor=cursor), max_job_runtime=120)
    def backfill(n, account_id):
        ...

    backfill.delay(42)

Without ``app=`` the task is a ``shared_task``; with ``app=`` it is
``app.task``.  Other keyword arguments are Celery task options or
:class:`~checkpoint.IterativeTask` attributes (``checkpoint_every``,
``max_job_runtime``, ``autoretry_for``...).  The hooks ``on_start``,
``on_resume``, ``on_shutdown`` and ``on_complete`` take the task first, then
the job's arguments; ``on_complete``'s return value is the task's result.
``throttles`` is a sequence of ``(condition, backoff_seconds)`` pairs.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Optional

from .task import IterativeTask, check_takes_cursor

__all__ = ["iterative_task"]

_HOOKS = ("on_start", "on_resume", "on_shutdown", "on_complete")


def iterative_task(*, enumerator: Callable[..., Iterable[tuple]], app: Any = None,
                   on_start: Optional[Callable[..., Any]] = None, on_resume: Optional[Callable[..., Any]] = None,
                   on_shutdown: Optional[Callable[..., Any]] = None, on_complete: Optional[Callable[..., Any]] = None,
                   throttles: Iterable[tuple[Callable[..., bool], float]] = (),
                   base: type = IterativeTask, **options: Any) -> Callable[[Callable[..., Any]], Any]:
    """Decorate ``each_iteration(item, *args, **kwargs)``; returns the registered task (or shared task proxy)."""
    if not callable(enumerator):
        raise TypeError(f"iterative_task(enumerator=...) must be callable, got {enumerator!r}")
    if not (isinstance(base, type) and issubclass(base, IterativeTask)):
        raise TypeError(f"iterative_task(base=...) must be an IterativeTask subclass, got {base!r}")
    check_takes_cursor(enumerator, "iterative_task(enumerator=...)",
                       "lambda task, *args, cursor=None: task.enumerate.integers(0, n, cursor=cursor)")
    hooks = {name: fn for name, fn in zip(_HOOKS, (on_start, on_resume, on_shutdown, on_complete)) if fn is not None}
    for name, fn in hooks.items():
        if not callable(fn):
            raise TypeError(f"iterative_task({name}=...) must be callable, got {fn!r}")
    declared = tuple((condition, float(backoff)) for condition, backoff in throttles)

    def decorate(each_iteration: Callable[..., Any]) -> Any:
        attrs: dict[str, Any] = {
            "build_enumerator": _as_method(enumerator),
            "each_iteration": staticmethod(each_iteration),
            "_throttles": tuple(base._throttles) + declared,
            "__module__": each_iteration.__module__,
            "__doc__": each_iteration.__doc__,
        }
        attrs.update({name: _as_method(fn) for name, fn in hooks.items()})
        iterative_base = type(f"{each_iteration.__name__}_base", (base,), attrs)

        def run(self: IterativeTask, *args: Any, **kwargs: Any) -> Any:
            return IterativeTask.run(self, *args, **kwargs)

        # Celery names the task (module.function) and its class after the function it is given.
        run.__name__, run.__qualname__ = each_iteration.__name__, each_iteration.__qualname__
        run.__module__, run.__doc__ = each_iteration.__module__, each_iteration.__doc__
        if app is None:
            from celery import shared_task
            register = shared_task(bind=True, base=iterative_base, **options)
        else:
            register = app.task(bind=True, base=iterative_base, **options)
        return register(run)

    return decorate


def _as_method(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn(task, *args, **kwargs)`` as a method (a plain function already is one; keeps the signature)."""
    def method(self: IterativeTask, *args: Any, **kwargs: Any) -> Any:
        return fn(self, *args, **kwargs)
    method.__name__ = getattr(fn, "__name__", "hook")
    try:
        method.__signature__ = inspect.signature(fn)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        pass
    return method
