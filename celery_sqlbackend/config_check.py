"""An app's sqlq configuration, checked before anything connects.

Why one place: the same mistakes (a broker URL kombu would read as an AMQP
host, a driver that is not installed, an SQLite directory that is missing, a
misspelt ``sqlq_<option>`` setting, an option out of range) must stop a worker
at start, fail a producer's first publish with the same words, and show in
``celery sqlq check``.  Each problem is one sentence that says what to write.
"""
from __future__ import annotations

from typing import Any

from .errors import ConfigurationError
from .options import Options, from_celery_conf
from .urls import broker_url, broker_url_problem, is_sqlq


def problems(conf: Any) -> list[str]:
    """Everything wrong with ``conf`` as an sqlq app's configuration (empty: nothing, or not ours)."""
    url = broker_url(conf)
    found = []
    problem = broker_url_problem(url)
    if problem is not None:
        found.append(problem)
    if is_sqlq(url) or problem is not None:
        try:
            Options.from_mapping(from_celery_conf(conf))
        except ConfigurationError as exc:
            found.append(str(exc))
    return found


def check(conf: Any) -> None:
    """Raise ``ConfigurationError`` naming every problem of ``conf``."""
    found = problems(conf)
    if found:
        raise ConfigurationError("celery_sqlbackend configuration: " + "; and ".join(found))
