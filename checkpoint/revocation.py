"""Knowing, inside the process that runs a job, that the job was revoked.

``celery control revoke ID`` (without ``terminate``) only adds the id to the
worker's in-memory ``revoked`` set in its *main* process: a job already
running goes on, and a prefork child never hears of it.  An iterative job can
do better, since it stops cleanly between items anyway.

* Threads and solo pools run tasks in the main process: the ``revoked`` set
  is read directly.
* Prefork children read a small table of revoked ids in shared memory,
  written by a relay thread of the main process (:func:`relay_once`, run by
  :mod:`checkpoint.housekeeping`) for the revoked ids of the requests it is
  running.  Ids are stored as 20-byte SHA-1 digests, so any id length fits a
  fixed slot; the mapping is created at import, before the pool forks, like
  the stop flag.  (Spawned children start with an empty table and fall back
  to the durable row's state at their next checkpoint.)
"""
from __future__ import annotations

import hashlib
import mmap
import os
import threading
from typing import Iterable

__all__ = ["is_revoked", "mark_revoked", "relay_once", "SLOTS"]

_DIGEST = 20
#: Revoked ids remembered at once (oldest overwritten first).
SLOTS = 512
_buf = mmap.mmap(-1, 1 + SLOTS * _DIGEST, flags=mmap.MAP_SHARED)
_next_slot = 0
_write_lock = threading.Lock()
_relayed: set[str] = set()


def _after_fork_in_child() -> None:
    global _write_lock
    _write_lock = threading.Lock()  # the relay thread may hold it while the pool forks


os.register_at_fork(after_in_child=_after_fork_in_child)


def _digest(task_id: str) -> bytes:
    return hashlib.sha1(task_id.encode("utf-8", "surrogatepass")).digest()


def mark_revoked(task_id: str) -> None:
    """Record ``task_id`` as revoked for every process forked from this one (and this one)."""
    global _next_slot
    with _write_lock:
        offset = 1 + (_next_slot % SLOTS) * _DIGEST
        _buf[offset:offset + _DIGEST] = _digest(task_id)
        _next_slot += 1


def _in_shared_table(task_id: str) -> bool:
    digest = _digest(task_id)
    pos = _buf.find(digest, 1)
    while pos != -1:
        if (pos - 1) % _DIGEST == 0:
            return True
        pos = _buf.find(digest, pos + 1)
    return False


def is_revoked(task_id: str) -> bool:
    """True once ``task_id`` was revoked (``celery control revoke``) while this worker runs it."""
    from celery.worker import state
    return task_id in state.revoked or _in_shared_table(task_id)


def relay_once(iterative_names: Iterable[str] | None = None) -> int:
    """Main process: copy revoked ids of running requests into the shared table; returns how many."""
    from celery.worker import state
    names = set(iterative_names) if iterative_names is not None else None
    relayed = 0
    for request in list(state.active_requests):
        task_id = request.id
        if task_id in _relayed or task_id not in state.revoked:
            continue
        if names is not None and request.name not in names:
            continue
        mark_revoked(task_id)
        _relayed.add(task_id)
        relayed += 1
    if len(_relayed) > SLOTS * 4:
        _relayed.clear()
    return relayed
