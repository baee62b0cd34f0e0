"""Green pools: make psycopg 3 wait cooperatively under eventlet.

Why: psycopg 3 waits for the server with a C function that blocks the whole
process unless it sees the ``select`` module monkey-patched by *gevent* (it
detects gevent only).  Under ``celery worker -P eventlet`` the first query
therefore blocks eventlet's hub and the worker never runs a task.  psycopg's
documented switch is the ``PSYCOPG_WAIT_FUNC`` environment variable, read when
``psycopg.waiting`` is first imported; ``wait_select`` calls ``select.select``,
which eventlet has made green.  ``import celery_sqlbackend`` sets it when
eventlet has patched ``select`` and psycopg is not imported yet (Celery patches
before it imports the app, so that is the usual case); if psycopg came first,
it says what to do instead.
"""
from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("celery_sqlbackend.green")

WAIT_FUNC_ENV = "PSYCOPG_WAIT_FUNC"
COOPERATIVE_WAIT = "wait_select"


def eventlet_patched() -> bool:
    """True if eventlet has monkey-patched ``select`` in this process."""
    patcher = sys.modules.get("eventlet.patcher")
    try:
        return bool(patcher is not None and patcher.is_monkey_patched("select"))
    except Exception:
        return False


def prepare_psycopg() -> None:
    """Under eventlet, have psycopg 3 wait through the green ``select`` (see the module docstring)."""
    if not eventlet_patched():
        return
    waiting = sys.modules.get("psycopg.waiting")
    if waiting is None:
        os.environ.setdefault(WAIT_FUNC_ENV, COOPERATIVE_WAIT)
        return
    if getattr(waiting, "wait", None) is not getattr(waiting, COOPERATIVE_WAIT, None) \
            and os.environ.get(WAIT_FUNC_ENV) is None:
        log.warning("psycopg was imported before eventlet's patching reached celery_sqlbackend, and it waits "
                    "in a way that blocks eventlet: PostgreSQL queries will stall the worker. Start the worker "
                    "with %s=%s in its environment.", WAIT_FUNC_ENV, COOPERATIVE_WAIT)
