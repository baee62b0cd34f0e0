"""Limits across every worker: ``Concurrency`` (jobs of a key running at once) and ``Rate`` (starts of a
key per period), declared on a task and enforced by the database every worker shares::

    @app.task(sqlq_limits=[Concurrency(2, key="account:{account_id}", duration=900)])
    def sync_account(account_id): ...

    @app.task(sqlq_limits=[Rate("10/s", key="api:{0}")])
    def call_partner(partner, payload): ...

Why in the database: Celery's own ``rate_limit`` is per worker *process* and
it has no concurrency limit; ten workers with ``rate_limit="10/s"`` start a
hundred a second.  The one place every worker sees is the store.

How a limit travels: ``keys.headers_for`` formats the keys from the call's
arguments when the task is sent (a key that cannot be made is an error then,
and nothing is sent) and puts them in the message's ``sqlq_limits`` header;
the channel turns the header into a ``JobLimits`` stored with the job
(``store.admission``).  The worker side (releasing slots, claiming throttled
jobs) is ``limits.worker``.
"""
from __future__ import annotations

from .concurrency import Concurrency
from .keys import LimitKeyError
from .rate import Rate

__all__ = ["Concurrency", "Rate", "LimitKeyError"]
