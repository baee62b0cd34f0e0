"""No SQLite connection is in use by another thread when this process forks.

Why: SQLite keeps its per-process lock bookkeeping for an open database file
(the unix VFS's inode record and the WAL-index lock slots) in ordinary
memory.  A child forked while another thread of the parent is inside a write
transaction inherits the note "a connection of this process holds the WAL
write lock", but neither the kernel lock nor the thread that would release
it.  Every connection the child opens to that file shares the note, so its
first write spins for the whole busy timeout and fails with "database is
locked" although no process holds the lock (``/proc/locks`` shows none).
Seen: a prefork child forked to replace a SIGKILLed one could never write a
checkpoint; a 3-line reproduction is ``tests/test_fork_gate.py``.

The gate: each checkout of a connection from a guarded engine passes it; a
fork (``os.register_at_fork(before=...)``) closes it, waits until no other
thread has a connection checked out, closes the idle ones (the child then
inherits no open SQLite file at all) and reopens the gate in both processes.
A thread that asks for a connection while a fork is pending waits for the
fork, which takes milliseconds.  The wait for busy threads is bounded
(:data:`FORK_WAIT_SECONDS`): a connection held longer than that is logged
and the fork goes ahead, as it would without the gate.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import weakref

from sqlalchemy import Engine, event

logger = logging.getLogger("celery_sqlbackend")

__all__ = ["guard", "FORK_WAIT_SECONDS"]

#: Longest a fork waits for other threads to return their SQLite connections.
FORK_WAIT_SECONDS = 10.0

_cond = threading.Condition()
_in_use: dict[int, int] = {}  # thread ident -> connections it has checked out
_forking_thread: int | None = None
_engines: "weakref.WeakSet[Engine]" = weakref.WeakSet()


def guard(engine: Engine) -> Engine:
    """Make ``engine``'s checkouts wait for a pending fork, and forks wait for them."""
    event.listen(engine, "do_connect", _on_connect)
    event.listen(engine, "checkout", _on_checkout)
    event.listen(engine, "checkin", _on_checkin)
    _engines.add(engine)
    return engine


def _enter(me: int) -> None:
    with _cond:
        while _forking_thread is not None and _forking_thread != me:
            _cond.wait()
        _in_use[me] = _in_use.get(me, 0) + 1


def _on_connect(_dialect, record, _cargs, _cparams) -> None:
    """Opening a connection counts as using one, until its checkout: ``sqlite3.connect`` and the
    connection's PRAGMAs take SQLite's process-wide mutexes and the WAL-index locks, and a child
    forked meanwhile inherits them held (seen: a pool process hung for ever in ``sqlite3.connect``).
    (A connect that fails leaves the count up: a fork then waits its bounded wait.)"""
    me = threading.get_ident()
    _enter(me)
    record.record_info["fork_gate_connecting"] = me


def _on_checkout(_dbapi_conn, record, _proxy) -> None:
    me = threading.get_ident()
    connecting = record.record_info.pop("fork_gate_connecting", None)
    if connecting == me:
        pass    # the connect's count carries over to this checkout: no fork passes in between
    else:
        if connecting is not None:
            _leave(connecting)
        _enter(me)
    record.record_info["fork_gate_thread"] = me


def _on_checkin(_dbapi_conn, record) -> None:
    owner = record.record_info.pop("fork_gate_thread", None)
    if owner is not None:
        _leave(owner)


def _leave(owner: int) -> None:
    with _cond:
        left = _in_use.get(owner, 0) - 1
        if left > 0:
            _in_use[owner] = left
        else:
            _in_use.pop(owner, None)
        _cond.notify_all()


def _others_in_use(me: int) -> int:
    return sum(n for ident, n in _in_use.items() if ident != me)


def _before_fork() -> None:
    global _forking_thread
    if not _engines:
        return
    me = threading.get_ident()
    _cond.acquire()
    _forking_thread = me
    deadline = time.monotonic() + FORK_WAIT_SECONDS
    while _others_in_use(me):
        left = deadline - time.monotonic()
        if left <= 0:
            logger.warning("fork: %d SQLite connection(s) still in use by other threads after %.0f s; forking anyway",
                           _others_in_use(me), FORK_WAIT_SECONDS)
            break
        _cond.wait(left)
    for engine in list(_engines):
        engine.dispose()  # idle connections closed: no open SQLite file crosses the fork
    # The condition stays held across fork(): no thread can check out until it is reopened.


def _after_fork_in_parent() -> None:
    global _forking_thread
    if _forking_thread is None:
        return
    _forking_thread = None
    _cond.notify_all()
    _cond.release()


def _after_fork_in_child() -> None:
    # Only the forking thread exists here: the parent's counts mean nothing.
    global _cond, _forking_thread
    _cond = threading.Condition()
    _in_use.clear()
    _forking_thread = None


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)
