"""LISTEN/NOTIFY on PostgreSQL: waking idle workers, and result waiters.

Producers ``pg_notify`` inside the writing transaction (``store.executions``
for ready jobs, ``store.results`` for ready results), so a wake-up is sent
on commit and never for a rolled-back write.  A notification is only a hint:
a worker always re-polls, and a result waiter re-reads, and polling remains
the fallback whenever the listening connection is down.  Other engines have
no notifications.  Channel names carry the store's ``table_prefix``.  The
listening connections go through psycopg 3 or psycopg2 (``pg_listen``).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from time import monotonic
from typing import Any, Callable, TypeVar

from .pg_listen import listen, listener_driver
from .sqlite_wake import SqliteWaker
from .sqlite_wake import waiter_for as sqlite_waiter_for
from .store import Store
from .store.executions import ready_channel
from .store.pooler import PARAMETER as POOL_MODE, driver_url
from .store.results import notify_channel as results_channel
from .urls import database_url, mask

log = logging.getLogger("celery_sqlbackend.notify")
T = TypeVar("T")


def _dsn(store: Store) -> dict[str, str]:
    """The URL to LISTEN on as libpq connection parameters, for either driver (with the password: never logged).

    The store's own URL, or ``listen_url`` when one is given (a direct connection beside a pooler).
    """
    url = driver_url(database_url(store.options.listen_url)) if store.options.listen_url else store.engine.url
    args = url.translate_connect_args(username="user", database="dbname")
    return {k: str(v) for k, v in {**args, **url.query}.items()}


class NotifyWaiter:
    """A dedicated autocommit connection LISTENing for ready jobs."""

    def __init__(self, dsn: dict[str, str], channel: str, driver: str = "psycopg"):
        self.dsn = dsn
        self.channel = channel
        self.driver = driver
        self._conn = None
        self._retry_at = 0.0
        self._lock = threading.Lock()

    def _connect(self):
        return listen(self.driver, self.dsn, self.channel)

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds; True if a job became ready meanwhile (or may have: a
        LISTEN just (re)established missed what was sent before it)."""
        with self._lock:
            if self._conn is None:
                if time.monotonic() < self._retry_at:
                    time.sleep(timeout)
                    return False
                try:
                    self._conn = self._connect()
                except Exception as exc:
                    log.warning("LISTEN connection failed (%s); polling only for the next 10s", mask(exc))
                    self._retry_at = time.monotonic() + 10
                    time.sleep(timeout)
                    return False
                # A job committed between the caller's last claim and this LISTEN sent its
                # NOTIFY to nobody: claim once more now that nothing can be missed.
                return True
            try:
                return bool(self._conn.wait(timeout))
            except Exception as exc:
                log.warning("LISTEN connection lost (%s); reconnecting", mask(exc))
                self.close()
                return False

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass


_listeners: dict[tuple, Any] = {}
_listeners_lock = threading.Lock()


def _listener(store: Store, channel: str, make: Callable[[dict[str, str], str, str], T]) -> T | None:
    """This process's one listener of kind ``make`` on ``channel`` of ``store``'s database, made on
    first use; None where there is nothing to listen to (no NOTIFY, turned off, or no driver).
    Keyed by pid: a forked child makes its own rather than share its parent's socket."""
    if not (store.dialect.notify and store.options.use_notify):
        return None
    if store.pool_mode == "transaction" and not store.options.listen_url:
        _say_polling(store)
        return None
    key = (make, store.url, channel, os.getpid())
    listener = _listeners.get(key)
    if listener is None:
        with _listeners_lock:
            listener = _listeners.get(key)
            if listener is None:
                driver = listener_driver(store.engine.url.get_driver_name())
                if driver is None:
                    return None
                listener = _listeners[key] = make(_dsn(store), channel, driver)
    return listener


_said_polling: set[tuple[str, int]] = set()


def _say_polling(store: Store) -> None:
    """Once per store and process: why this process polls instead of listening."""
    key = (store.url, os.getpid())
    if key not in _said_polling:
        _said_polling.add(key)
        log.warning("%s: %s=transaction (a pooler such as PgBouncer in transaction mode) cannot carry LISTEN, "
                    "so this process polls for ready jobs and results every polling_interval instead of being "
                    "woken; set the listen_url option (sqlq_listen_url) to a direct PostgreSQL URL for wake-ups",
                    mask(store.engine.url), POOL_MODE)


def waiter_for(store: Store) -> NotifyWaiter | SqliteWaker | None:
    """This process's waiter for ready jobs of ``store``: LISTEN on PostgreSQL, the wake socket
    beside a SQLite file (``sqlite_wake``), None where only the poll wakes a worker."""
    if store.dialect.embedded:
        return sqlite_waiter_for(store.engine) if store.options.sqlite_wake else None
    return _listener(store, ready_channel(store.t), NotifyWaiter)


# --------------------------------------------------------------------------- results

class ResultNotifier:
    """One LISTEN connection per process, shared by every waiting thread.

    Whichever waiting thread finds nobody reading becomes the reader for one
    wait; the task ids it receives are numbered and kept in a bounded window,
    so that every waiter learns which results landed since its last look.
    A waiter holds a *token* (connection epoch, sequence number) taken
    *before* it queried; anything committed after that shows up as newer.
    """

    WINDOW = 100_000

    def __init__(self, dsn: dict[str, str], channel: str, driver: str = "psycopg"):
        self.dsn = dsn
        self.channel = channel
        self.driver = driver
        self._cond = threading.Condition()
        self._conn = None
        self._reading = False
        self._epoch = 0
        self._seq = 0
        self._recent: deque[tuple[int, str]] = deque(maxlen=self.WINDOW)
        self._retry_at = 0.0

    def token(self):
        with self._cond:
            if self._conn is None and monotonic() >= self._retry_at and not self._reading:
                try:
                    self._conn = listen(self.driver, self.dsn, self.channel)
                    self._epoch += 1
                except Exception as exc:
                    log.warning("result LISTEN connection failed (%s); polling for the next 10s", mask(exc))
                    self._retry_at = monotonic() + 10
            return (self._epoch, self._seq) if self._conn is not None else None

    def wait(self, token, timeout: float):
        """Wait up to ``timeout``; returns ``(token, ids)``.

        ``ids`` is the set of task ids announced since ``token``, or None when
        that is unknown (timed out, no listener, reconnected, window overrun):
        the caller then re-reads everything it waits for.
        """
        deadline = monotonic() + timeout
        with self._cond:
            while True:
                if token is None or self._conn is None or token[0] != self._epoch:
                    remaining = deadline - monotonic()
                    if remaining > 0 and (token is None or self._conn is None):
                        self._cond.wait(remaining)
                    return self._token_locked(), None
                if self._seq != token[1]:
                    return self._since_locked(token[1])
                remaining = deadline - monotonic()
                if remaining <= 0:
                    return token, None
                if self._reading:
                    self._cond.wait(remaining)
                    continue
                self._read_locked(remaining)

    def _token_locked(self):
        return (self._epoch, self._seq) if self._conn is not None else None

    def _since_locked(self, seq: int):
        token = (self._epoch, self._seq)
        if not self._recent or self._recent[0][0] > seq + 1:
            return token, None      # the window no longer reaches back to ``seq``
        ids = set()
        for s, task_id in reversed(self._recent):
            if s <= seq:
                break
            ids.add(task_id)
        return token, ids

    def _read_locked(self, timeout: float) -> None:
        self._reading = True
        conn = self._conn
        got: list[str] = []
        error = None
        self._cond.release()
        try:
            try:
                got = conn.wait(timeout)
            except Exception as exc:  # connection lost: reconnect on the next token()
                error = exc
        finally:
            self._cond.acquire()
            self._reading = False
        if error is not None:
            log.warning("result LISTEN connection lost (%s); reconnecting", mask(error))
            self._conn = None
            self._epoch += 1
            try:
                conn.close()
            except Exception:
                pass
        for task_id in got:
            self._seq += 1
            self._recent.append((self._seq, task_id))
        self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            conn, self._conn = self._conn, None
            self._epoch += 1
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass


#: Keyed by pid as well: a forked child makes its own.  The parent's entries
#: stay referenced in the child on purpose: dropping them would let psycopg
#: finish the inherited connection and end the parent's LISTEN session.


def result_notifier_for(store: Store) -> ResultNotifier | None:
    """This process's result notifier for ``store``."""
    return _listener(store, results_channel(store.t), ResultNotifier)
