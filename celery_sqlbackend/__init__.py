"""celery_sqlbackend: Celery's broker and result backend, kept in your SQL database.

``import celery_sqlbackend`` registers the ``sqlq`` kombu transport, so that
``broker_url = "sqlq+sqlite:///jobs.sqlite3"`` (or any ``sqlq+<SQLAlchemy URL>``)
works; the result backend (``result_backend = "sqlq+…"``) is found through
Celery's ``celery.result_backends`` entry point.

Enqueueing with the application's data: ``enqueue_in(session_or_connection)``
(jobs written in the caller's transaction), ``enqueue_many(signatures)`` (one
transaction, multi-row inserts; groups and chords are batched the same way),
unique jobs (``@app.task(sqlq_unique="{0}", sqlq_unique_for=600)``), and limits across every worker
(``@app.task(sqlq_limits=[Concurrency(2, key="account:{0}"), Rate("10/s", key="api")])``).
"""
from __future__ import annotations

__version__ = "0.1.0"

SCHEME = "sqlq"
TRANSPORT = "celery_sqlbackend.transport:Transport"


def register() -> None:
    """Register the ``sqlq`` transport alias with kombu (idempotent)."""
    from kombu.transport import TRANSPORT_ALIASES
    TRANSPORT_ALIASES.setdefault(SCHEME, TRANSPORT)
    from . import bulk, green, lifecycle, unique
    green.prepare_psycopg()
    lifecycle.connect_signals()
    unique.install()
    bulk.install()


register()

from .bulk import enqueue_many  # noqa: E402  (after register: the public API)
from .publishing import BatchFailedError, WrongDatabaseError, enqueue_in  # noqa: E402
from .unique import UniqueKeyError  # noqa: E402
from .limits import Concurrency, LimitKeyError, Rate  # noqa: E402

__all__ = ["register", "enqueue_in", "enqueue_many", "WrongDatabaseError", "BatchFailedError", "UniqueKeyError",
           "Concurrency", "Rate", "LimitKeyError", "SCHEME", "TRANSPORT", "__version__"]
