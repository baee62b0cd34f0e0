"""A task's limits as message headers: the keys formatted from one call's arguments.

Why at send time, in the producer: the key comes from the arguments, and a
key that cannot be made must fail the ``apply_async`` that asked for it
(with nothing sent), not a worker later.  ``unique.install``'s wrapper of
``Task.apply_async`` calls ``headers_for``; ``send_task`` callers may set the
``sqlq_limits`` header themselves (the shape ``job_limits`` reads).
"""
from __future__ import annotations

import hashlib
import inspect
from typing import Any, Mapping

from ..errors import ConfigurationError, SQLQError
from ..store.admission import JobLimits
from .concurrency import Concurrency, KeyTemplate
from .rate import Rate

HEADER = "sqlq_limits"
OPTION = "sqlq_limits"
KEY_LENGTH = 255


class LimitKeyError(SQLQError, ValueError):
    """A task's limit key cannot be made from the arguments of this call."""


def limits_of(task: Any) -> tuple[Concurrency | None, Rate | None]:
    """The task's ``sqlq_limits`` (at most one ``Concurrency`` and one ``Rate``), checked."""
    declared = getattr(task, OPTION, None)
    if declared is None:
        return None, None
    items = [declared] if isinstance(declared, (Concurrency, Rate)) else declared
    concurrency = [x for x in items if isinstance(x, Concurrency)]
    rate = [x for x in items if isinstance(x, Rate)]
    if len(concurrency) + len(rate) != len(list(items)) or len(concurrency) > 1 or len(rate) > 1:
        raise ConfigurationError(
            f"task {task.name!r}: sqlq_limits={declared!r}: write a list of at most one Concurrency and one "
            "Rate, e.g. sqlq_limits=[Concurrency(2, key='account:{0}'), Rate('10/s', key='api')]")
    return (concurrency[0] if concurrency else None), (rate[0] if rate else None)


def key_for(task: Any, template: KeyTemplate, args: tuple, kwargs: dict, what: str) -> str:
    """``template`` applied to the call's arguments (None: the task's name); long keys are hashed."""
    if template is None:
        return _fit(task.name)
    try:
        text = template(*args, **kwargs) if callable(template) else str(template).format(
            *args, **_by_name(task, args, kwargs))
    except (IndexError, KeyError, AttributeError, ValueError, TypeError) as exc:
        raise LimitKeyError(
            f"task {task.name!r}: its {what} key {template!r} cannot be made from this call's {len(args)} "
            f"positional argument(s) and keyword(s) {sorted(kwargs)} ({exc.__class__.__name__}: {exc}); "
            "nothing was enqueued. Pass the arguments the key names, or change the key ('{0}' is the first "
            "positional argument, '{account_id}' the argument of that name; a callable gets the arguments).") from None
    return _fit(str(text))


def _by_name(task: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by parameter name (``{account_id}`` names the first argument of
    ``sync_account(account_id)`` however it was passed), defaults included."""
    named = dict(kwargs)
    try:
        bound = inspect.signature(task.run).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return named
    bound.apply_defaults()
    for name, value in bound.arguments.items():
        param = bound.signature.parameters[name]
        if param.kind is param.VAR_KEYWORD:
            named.update(value)
        elif param.kind is not param.VAR_POSITIONAL:
            named.setdefault(name, value)
    return named


def _fit(key: str) -> str:
    if len(key) <= KEY_LENGTH:
        return key
    return f"{key[:KEY_LENGTH - 72]}:sha256:{hashlib.sha256(key.encode()).hexdigest()}"


def headers_for(task: Any, args: Any, kwargs: Any) -> dict[str, Any] | None:
    """The ``sqlq_limits`` header for a call of ``task``, or None if it declares no limits."""
    concurrency, rate = limits_of(task)
    if concurrency is None and rate is None:
        return None
    args, kwargs = tuple(args or ()), dict(kwargs or {})
    value: dict[str, list] = {}
    if concurrency is not None:
        value["concurrency"] = [key_for(task, concurrency.key, args, kwargs, "Concurrency"),
                                concurrency.limit, concurrency.duration]
    if rate is not None:
        value["rate"] = [key_for(task, rate.key, args, kwargs, "Rate"), rate.limit, rate.period]
    return {HEADER: value}


def job_limits(headers: Mapping[str, Any]) -> JobLimits | None:
    """The limits a published message carries, or None; a header of another shape is an error at
    enqueue (a job must never run unlimited because its limit was misspelt)."""
    value = headers.get(HEADER)
    if not value:
        return None
    try:
        c, r = value.get("concurrency"), value.get("rate")
        return JobLimits(
            concurrency_key=_fit(str(c[0])) if c else None, concurrency_limit=int(c[1]) if c else None,
            concurrency_duration=float(c[2]) if c else None,
            rate_key=_fit(str(r[0])) if r else None, rate_limit=int(r[1]) if r else None,
            rate_period=float(r[2]) if r else None)
    except (AttributeError, TypeError, ValueError, IndexError, KeyError):
        raise ConfigurationError(
            f"the {HEADER} header {value!r} is not a limit: write {{'concurrency': [key, limit, seconds], "
            "'rate': [key, starts, period seconds]}} (or declare sqlq_limits on the task)") from None


def holds_slot(payload: Mapping[str, Any]) -> bool:
    """A delivered message whose job took a ``Concurrency`` slot (its finish gives it back)."""
    value = (payload.get("headers") or {}).get(HEADER)
    return bool(value) and isinstance(value, Mapping) and bool(value.get("concurrency"))


def counts_rate(payload: Mapping[str, Any]) -> bool:
    """A delivered message whose job was claimed within a ``Rate``."""
    value = (payload.get("headers") or {}).get(HEADER)
    return bool(value) and isinstance(value, Mapping) and bool(value.get("rate"))
