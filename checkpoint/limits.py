"""How long one run of an iterative job may last, and what the broker allows.

Brokers that redeliver an unacknowledged message after a *visibility
timeout* (Redis, SQS) start a second copy of a job that runs longer than it,
while the first is still going: both iterate, both complete.  An iterative
job need never run that long: it can re-enqueue itself with its cursor and
be acknowledged.  So every run has a limit, ``max_job_runtime``:

* set on the task class (``math.inf`` for none), else
* :data:`DEFAULT_MAX_JOB_RUNTIME` (5 minutes), lowered to half the broker's
  visibility timeout when that is known and shorter;
* app conf ``checkpoint_max_job_runtime`` caps every task.

:func:`configuration_warnings` tells the worker, at start, when a limit is
not below the visibility timeout.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional

__all__ = ["DEFAULT_MAX_JOB_RUNTIME", "visibility_timeout", "max_job_runtime", "configuration_warnings"]

DEFAULT_MAX_JOB_RUNTIME = 300.0

#: kombu's defaults for transports whose unacked messages come back after a timeout.
_DEFAULT_VISIBILITY = {"redis": 3600.0, "rediss": 3600.0, "sentinel": 3600.0, "sqs": 1800.0}


def visibility_timeout(app: Any) -> Optional[float]:
    """The broker's visibility timeout in seconds, or ``None`` when it has none (sqlq, AMQP)."""
    url = app.conf.broker_url or ""
    scheme = url.split("://", 1)[0].split("+", 1)[0] if isinstance(url, str) else ""
    if scheme not in _DEFAULT_VISIBILITY:
        return None
    configured = (app.conf.broker_transport_options or {}).get("visibility_timeout")
    return float(configured) if configured else _DEFAULT_VISIBILITY[scheme]


def max_job_runtime(app: Any, task_value: Optional[float]) -> Optional[float]:
    """The effective limit of one run, in seconds (``None``: unlimited)."""
    if task_value is None:
        limit = DEFAULT_MAX_JOB_RUNTIME
        timeout = visibility_timeout(app)
        if timeout is not None:
            limit = min(limit, timeout / 2)
    else:
        limit = float(task_value)
    cap = app.conf.get("checkpoint_max_job_runtime")
    if cap:
        limit = min(limit, float(cap))
    return None if math.isinf(limit) else limit


def configuration_warnings(app: Any, tasks: Iterable[Any]) -> list[str]:
    """What to tell the operator when a worker starts (one line each)."""
    warnings = []
    timeout = visibility_timeout(app)
    if timeout is not None:
        for task in tasks:
            limit = max_job_runtime(app, task.max_job_runtime)
            if limit is None or limit >= timeout:
                shown = "no limit" if limit is None else f"{limit:g}s"
                warnings.append(
                    f"checkpoint: {task.name} may run {shown} at a time, not below the broker's visibility "
                    f"timeout ({timeout:g}s): the broker will deliver it again while it runs. Lower "
                    "max_job_runtime (or raise broker_transport_options['visibility_timeout']).")
    return warnings
