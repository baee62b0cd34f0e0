"""What the worker's main process does for iterative jobs besides running them.

Started by the worker bootstep (:mod:`checkpoint.integration`) when the app
has iterative tasks:

* At start, say once what is misconfigured: no durable cursor store (a run
  killed outright restarts from its last re-enqueued cursor), a missing
  checkpoint table, a ``max_job_runtime`` not below the broker's visibility
  timeout.
* A daemon thread relays revokes of running jobs to prefork children every
  ``RELAY_INTERVAL`` seconds (:mod:`checkpoint.revocation`), and expires old
  checkpoint rows every ``checkpoint_expire_interval`` seconds (default one
  hour; rows not updated for ``checkpoint_expires`` seconds, default 7 days).
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Optional

from . import limits, revocation
from sqlalchemy.pool import NullPool

from .store import DEFAULT_EXPIRES, SQLCursorStore, store_for_app

__all__ = ["start", "stop", "startup_warnings", "RELAY_INTERVAL"]

logger = logging.getLogger("checkpoint")

RELAY_INTERVAL = 0.1
DEFAULT_EXPIRE_INTERVAL = 3600.0

_thread: Optional["Housekeeper"] = None
_lock = threading.Lock()


def iterative_tasks(app: Any) -> list:
    """The app's iterative tasks, known by their ``checkpoint_iterative`` marker.

    Not ``isinstance(t, IterativeTask)``: checkpoint.task imports the worker
    integration, which imports this module, so importing the task module here
    would close an import cycle.
    """
    return [t for t in app.tasks.values() if getattr(type(t), "checkpoint_iterative", False) is True]


def _own_store(store: Any) -> Any:
    """A private, unpooled copy of a SQL store for the main process.

    Pool children are forked from the main process at any time (a killed
    child is replaced): no connection of ours may stay open there, or a
    child could inherit SQLite lock state it does not hold.
    """
    if isinstance(store, SQLCursorStore):
        return SQLCursorStore(store.url, table_prefix=store.table.name[:-len("checkpoints")], poolclass=NullPool)
    return store


def startup_warnings(app: Any, tasks: list) -> list[str]:
    """Configuration problems worth one log line each when a worker starts."""
    warnings = []
    stores = {_own_store(t.cursor_store if t.cursor_store is not None else store_for_app(app)) for t in tasks}
    if any(not getattr(s, "durable", True) for s in stores):
        warnings.append(
            "checkpoint: no durable cursor store (the broker is not sqlq+ and checkpoint_store_url is unset): "
            "retries and interruptions resume from the cursor in their message, but a run killed outright "
            "(OOM, SIGKILL) restarts from its last re-enqueued cursor, and a redelivered copy of a completed "
            "job runs again. Set app.conf.checkpoint_store_url = 'postgresql+psycopg://…' (or "
            "'sqlite:////path/checkpoints.db').")
    for store in stores:
        if isinstance(store, SQLCursorStore):
            try:
                store.check()
            except Exception as exc:
                warnings.append(f"checkpoint: the durable cursor store is not usable: {type(exc).__name__}: {exc}")
    warnings.extend(limits.configuration_warnings(app, tasks))
    return warnings


class Housekeeper(threading.Thread):
    def __init__(self, app: Any, names: set[str]) -> None:
        super().__init__(name="checkpoint-housekeeping", daemon=True)
        self.app = app
        self.names = names
        self.stopped = threading.Event()
        self.expire_interval = float(app.conf.get("checkpoint_expire_interval") or DEFAULT_EXPIRE_INTERVAL)
        self.expires = float(app.conf.get("checkpoint_expires") or DEFAULT_EXPIRES)

    def run(self) -> None:
        next_expiry = 0.0
        elapsed = 0.0
        while not self.stopped.wait(RELAY_INTERVAL):
            elapsed += RELAY_INTERVAL
            try:
                revocation.relay_once(self.names)
            except Exception:
                logger.exception("checkpoint: relaying revokes failed")
            if elapsed >= next_expiry:
                next_expiry = elapsed + self.expire_interval
                self.expire()

    def expire(self) -> None:
        store = _own_store(store_for_app(self.app))
        if not isinstance(store, SQLCursorStore):
            return
        try:
            removed = store.expire(self.expires)
        except Exception as exc:
            logger.warning("checkpoint: expiring old checkpoint rows failed: %s: %s", type(exc).__name__, exc)
            return
        if removed:
            logger.info("checkpoint: expired %d checkpoint rows older than %gs", removed, self.expires,
                        extra={"action": "expired", "count": removed})


def start(worker: Any) -> None:
    """Warn about configuration once, and start the thread (once per process)."""
    global _thread
    app = getattr(worker, "app", None)
    if app is None:
        return
    tasks = iterative_tasks(app)
    if not tasks:
        return
    for line in startup_warnings(app, tasks):
        logger.warning(line)
    with _lock:
        if _thread is None or not _thread.is_alive():
            _thread = Housekeeper(app, {t.name for t in tasks})
            _thread.start()


def stop() -> None:
    global _thread
    with _lock:
        if _thread is not None:
            _thread.stopped.set()
            _thread = None
