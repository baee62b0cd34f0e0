"""Counting the transactions that lost a lock race and were run again.

Why count: a retried deadlock costs a rollback and a backoff, and is
otherwise invisible.  A few are the normal price of row locks (InnoDB picks a
victim whenever two transactions wait on each other); many mean a statement
takes its locks out of index order or over a range, which is a bug to fix,
as Solid Queue's MySQL deadlocks were (rails/solid_queue #162, #531, #609).

How it is logged (one decision for every engine):

* every retry at DEBUG, with its cause and the process's running total;
* at most once a minute, when the last minute saw ``WARN_PER_MINUTE`` or more
  retries, one WARNING that sums them up by cause (deadlock, lock wait
  timeout, serialization failure, SQLite busy, ...), so a worker's log shows a
  hot spot without a line per retry;
* ``snapshot()`` gives the totals since the process started (``celery sqlq
  status`` and tests read them).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter

log = logging.getLogger("celery_sqlbackend.store")

#: A minute with this many retries (or more) is worth a WARNING.
WARN_PER_MINUTE = 20
WINDOW = 60.0

_lock = threading.Lock()
_totals: Counter = Counter()
_window: Counter = Counter()
_window_start = time.monotonic()


def record(cause: str, statement: str, attempt: int, delay: float) -> None:
    """Count one retry of ``statement`` because of ``cause``; log as the module doc says."""
    global _window_start
    now = time.monotonic()
    summary = None
    with _lock:
        _totals[cause] += 1
        total = sum(_totals.values())
        if now - _window_start >= WINDOW:
            if sum(_window.values()) >= WARN_PER_MINUTE:
                summary = dict(_window)
            _window.clear()
            _window_start = now
        _window[cause] += 1
        in_window = sum(_window.values())
        if summary is None and in_window == WARN_PER_MINUTE:
            summary = dict(_window)   # the first busy minute says so at once, not a minute later
    log.debug("transaction %s lost a lock race (%s); retry %d in %.3fs (%d retried in this process)",
              statement, cause, attempt, delay, total)
    if summary is not None:
        log.warning("%d transactions retried after lock conflicts in the last minute (%s); frequent "
                    "retries mean contention: see the store's lock order", sum(summary.values()),
                    ", ".join(f"{k} {v}" for k, v in sorted(summary.items())))


def snapshot() -> dict[str, int]:
    """Retries by cause since this process started."""
    with _lock:
        return dict(_totals)


def _reset_after_fork() -> None:
    global _lock, _window_start
    _lock = threading.Lock()
    _totals.clear()
    _window.clear()
    _window_start = time.monotonic()


os.register_at_fork(after_in_child=_reset_after_fork)
