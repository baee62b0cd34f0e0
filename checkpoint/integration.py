"""Celery wiring: set the stop flag when the worker is asked to stop.

(Deliberately not called ``celery.py``: that name would shadow the real
package for ``import celery`` inside this one.)

Celery has three different ways of stopping a worker and no single hook sees
all of them, so the flag is set from three places, all in the worker's main
process (see CELERY-NOTES §4.2/§4.3):

1. ``worker_shutting_down`` — warm shutdown (SIGTERM, first SIGINT).  Sent from
   inside the signal handler, before Celery waits for running tasks.
2. A wrapper around ``WorkController.wait_for_soft_shutdown`` — the cold path
   (SIGQUIT, second SIGINT, ``REMAP_SIGTERM``) with soft shutdown enabled.
   Celery sends ``worker_shutting_down`` there only *after* the soft wait, when
   tasks have already been killed, so the flag must be set before the wait.
3. The :class:`StopFlagStep` bootstep's ``close()`` — ``celery control
   shutdown`` sends no signal at all; every stop path reaches ``Blueprint.stop``
   which calls ``close`` on each step.

Deployment rule: signal the worker's *main* process only (systemd
``KillMode=mixed``, the container's PID 1 being ``celery``).  A SIGTERM to the
whole process group kills prefork children outright (they keep SIGTERM's
default action), mid-iteration, before any flag can help; only the durable
checkpoint limits the loss then.

Lifecycle, in one place:

* worker_init / bootstep ``__init__``: clear the flag, publish its path for
  spawned children (``worker_pool_start_method='spawn'`` only), wrap
  ``wait_for_soft_shutdown``.
* bootstep ``start``: :func:`checkpoint.housekeeping.start` (warnings, revoke
  relay, expiry of old checkpoint rows).
* warm signal, soft wait, blueprint close: set the flag.
"""
from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

from celery import bootsteps, signals

from . import housekeeping
from .interruption import FLAG

__all__ = ["install", "StopFlagStep", "is_installed"]

logger = logging.getLogger("checkpoint")

_installed: "weakref.WeakSet[Any]" = weakref.WeakSet()
_install_lock = threading.Lock()
_signals_connected = False


class StopFlagStep(bootsteps.StartStopStep):
    """Worker bootstep that owns the stop flag for the worker's lifetime."""

    label = "checkpoint-stopflag"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        _prepare_worker_process(worker)
        _wrap_soft_shutdown(worker)

    def create(self, worker: Any) -> "StopFlagStep":
        return self

    def start(self, worker: Any) -> None:
        # Configuration warnings, revoke relay, expiry (checkpoint.housekeeping).
        housekeeping.start(worker)

    def close(self, worker: Any) -> None:
        # Backstop for `celery control shutdown`, KeyboardInterrupt, errors.
        _set_flag("blueprint_close")

    def stop(self, worker: Any) -> None:
        _set_flag("blueprint_stop")
        housekeeping.stop()

    def terminate(self, worker: Any) -> None:
        _set_flag("blueprint_terminate")


def _set_flag(how: str) -> None:
    # Keep the first store first: this may run inside a signal handler.
    already = FLAG.is_set()
    FLAG.set()
    if not already:
        logger.debug("checkpoint: stop flag set (%s)", how, extra={"action": "stop_flag_set", "how": how})


def _prepare_worker_process(worker: Any) -> None:
    """A new worker starts out "not stopping", and spawned children can find the flag."""
    FLAG.clear()
    if getattr(worker, "pool_start_method", "fork") != "fork":
        FLAG.publish()


def _wrap_soft_shutdown(worker: Any) -> None:
    original = getattr(worker, "wait_for_soft_shutdown", None)
    if original is None or getattr(original, "_checkpoint_wrapped", False):
        # Celery < 5.5 has no soft shutdown: nothing to wrap.
        return

    def wait_for_soft_shutdown(*args: Any, **kwargs: Any) -> Any:
        _set_flag("soft_shutdown")
        return original(*args, **kwargs)

    wait_for_soft_shutdown._checkpoint_wrapped = True  # type: ignore[attr-defined]
    worker.wait_for_soft_shutdown = wait_for_soft_shutdown


def _on_worker_shutting_down(sender: Any = None, how: str = "", **kwargs: Any) -> None:
    _set_flag(f"worker_shutting_down:{how}")


def _on_worker_init(sender: Any = None, **kwargs: Any) -> None:
    # Backstop for apps whose worker blueprint was built without our step
    # (e.g. IterativeTask imported lazily).  worker_init fires before the Pool
    # step starts, so the flag created at import is still inherited.
    _prepare_worker_process(sender)
    app = getattr(sender, "app", None)
    if app is not None:
        install(app)
    if sender is not None:
        _wrap_soft_shutdown(sender)


def _connect_signals() -> None:
    global _signals_connected
    if not _signals_connected:
        signals.worker_shutting_down.connect(_on_worker_shutting_down, weak=False)
        signals.worker_init.connect(_on_worker_init, weak=False)
        _signals_connected = True


def install(app: Any) -> None:
    """Make ``app``'s workers set the checkpoint stop flag.  Idempotent.

    :class:`~checkpoint.IterativeTask` calls this for the app it is registered
    with; call it yourself only when reading :func:`checkpoint.stopping` from
    plain tasks.
    """
    with _install_lock:
        _connect_signals()
        if app in _installed:
            return
        app.steps["worker"].add(StopFlagStep)
        _installed.add(app)


def is_installed(app: Any) -> bool:
    return app in _installed
