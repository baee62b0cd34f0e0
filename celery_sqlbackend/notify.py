"""Waking idle workers on PostgreSQL with LISTEN/NOTIFY.

Producers ``pg_notify`` inside the enqueue transaction, so the wake-up is
sent on commit and never for a rolled-back job.  A notification is only a
hint: the worker always re-polls, and polling at ``polling_interval`` remains
the fallback whenever the listening connection is down.  Other engines have
no notifications; their workers just poll.
"""
from __future__ import annotations

import logging
import os
import threading
import time

from .store import Store
from .store.executions import ready_channel

log = logging.getLogger("celery_sqlbackend.notify")


class NotifyWaiter:
    """A dedicated autocommit psycopg connection LISTENing for ready jobs."""

    def __init__(self, dsn: str, channel: str):
        self.dsn = dsn
        self.channel = channel
        self._conn = None
        self._retry_at = 0.0
        self._lock = threading.Lock()

    def _connect(self):
        import psycopg
        conn = psycopg.connect(self.dsn, autocommit=True)
        conn.execute(f"LISTEN {self.channel}")
        return conn

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds; True if a job became ready meanwhile."""
        with self._lock:
            if self._conn is None:
                if time.monotonic() < self._retry_at:
                    time.sleep(timeout)
                    return False
                try:
                    self._conn = self._connect()
                except Exception as exc:
                    log.warning("LISTEN connection failed (%s); polling only for the next 10s", exc)
                    self._retry_at = time.monotonic() + 10
                    time.sleep(timeout)
                    return False
            try:
                got = False
                for _ in self._conn.notifies(timeout=timeout, stop_after=1):
                    got = True
                # Drain whatever else arrived so the next wait does not return at once.
                if got:
                    for _ in self._conn.notifies(timeout=0):
                        pass
                return got
            except Exception as exc:
                log.warning("LISTEN connection lost (%s); reconnecting", exc)
                self.close()
                return False

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass


_waiters: dict[tuple[int, int], NotifyWaiter] = {}


def waiter_for(store: Store) -> NotifyWaiter | None:
    """This process's waiter for ``store``, or None where there is nothing to listen to."""
    if not (store.dialect.notify and store.options.use_notify):
        return None
    key = (id(store), os.getpid())
    waiter = _waiters.get(key)
    if waiter is None:
        url = store.engine.url.set(drivername="postgresql")
        waiter = _waiters[key] = NotifyWaiter(url.render_as_string(hide_password=False), ready_channel(store.t))
    return waiter
