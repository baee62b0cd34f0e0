"""Alembic migrations of the store, run programmatically (no alembic.ini).

Use :func:`celery_sqlbackend.admin.migrate` or ``celery -A proj sqlq migrate``.
The table prefix is passed in ``Config.attributes["table_prefix"]``; each
prefix keeps its own version table, ``<prefix>alembic_version``.
"""
from pathlib import Path

SCRIPT_LOCATION = str(Path(__file__).resolve().parent)
