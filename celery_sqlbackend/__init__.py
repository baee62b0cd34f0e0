"""celery_sqlbackend: Celery's broker and result backend, kept in your SQL database.

``import celery_sqlbackend`` registers the ``sqlq`` kombu transport, so that
``broker_url = "sqlq+sqlite:///jobs.sqlite3"`` (or any ``sqlq+<SQLAlchemy URL>``)
works; the result backend (``result_backend = "sqlq+…"``) is found through
Celery's ``celery.result_backends`` entry point.
"""
from __future__ import annotations

__version__ = "0.1.0"

SCHEME = "sqlq"
TRANSPORT = "celery_sqlbackend.transport:Transport"


def register() -> None:
    """Register the ``sqlq`` transport alias with kombu (idempotent)."""
    from kombu.transport import TRANSPORT_ALIASES
    TRANSPORT_ALIASES.setdefault(SCHEME, TRANSPORT)
    from . import green, lifecycle
    green.prepare_psycopg()
    lifecycle.connect_signals()


register()

__all__ = ["register", "SCHEME", "TRANSPORT", "__version__"]
