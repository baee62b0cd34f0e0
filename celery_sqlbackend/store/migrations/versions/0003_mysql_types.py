"""MySQL/MariaDB column types: microsecond timestamps, payloads past 64 KiB.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

On MySQL and MariaDB the generic types of 0001/0002 fall short: ``DATETIME``
keeps whole seconds (heartbeat ages, claim times and the order of results
need microseconds), and ``TEXT``/``BLOB`` stop at 64 KiB (a task's arguments
or a result can be megabytes; an INSERT past the limit fails).  This revision
moves those columns to ``DATETIME(6)``, ``LONGTEXT`` and ``LONGBLOB`` there,
as ``schema.py`` now declares them.  PostgreSQL and SQLite are left alone.

Frozen: later schema changes get a new revision, never an edit here.
"""
from alembic import context, op
import sqlalchemy as sa
from sqlalchemy.dialects import mysql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

#: (table without prefix, column, nullable) of every timestamp column.
TIMESTAMPS = [
    ("jobs", "created_at", False), ("jobs", "scheduled_at", True), ("jobs", "expires_at", True),
    ("jobs", "finished_at", True), ("ready_executions", "created_at", False),
    ("scheduled_executions", "scheduled_at", False), ("claimed_executions", "claimed_at", False),
    ("claimed_executions", "acked_at", True), ("failed_executions", "failed_at", False),
    ("processes", "started_at", False), ("processes", "last_heartbeat_at", False),
    ("pauses", "created_at", False), ("bindings", "expires_at", True), ("results", "date_done", True),
    ("results", "updated_at", False), ("groups", "date_done", False), ("chords", "created_at", False),
    ("checkpoints", "started_at", True), ("checkpoints", "updated_at", False), ("checkpoints", "finished_at", True),
]
#: (table, column, nullable) of the payload-sized text columns.
TEXTS = [
    ("jobs", "payload", False), ("failed_executions", "error", False), ("checkpoints", "cursor", True),
    ("checkpoints", "counters", False), ("checkpoints", "error", True),
]
#: (table, column, nullable) of the binary payload columns.
BLOBS = [("results", "payload", False), ("groups", "payload", False)]


def _mysql() -> bool:
    return context.get_context().dialect.name in ("mysql", "mariadb")


def _alter(columns: list, new: sa.types.TypeEngine, old: sa.types.TypeEngine) -> None:
    prefix = context.config.attributes.get("table_prefix", "sqlq_")
    by_table: dict[str, list] = {}
    for table, column, nullable in columns:
        by_table.setdefault(table, []).append((column, nullable))
    for table, cols in by_table.items():
        # One ALTER TABLE per table (MySQL rebuilds the table once, not once per column).
        with op.batch_alter_table(f"{prefix}{table}", recreate="never") as batch:
            for column, nullable in cols:
                batch.alter_column(column, type_=new, existing_type=old, existing_nullable=nullable)


def upgrade() -> None:
    if not _mysql():
        return
    _alter(TIMESTAMPS, mysql.DATETIME(fsp=6), sa.DateTime())
    _alter(TEXTS, mysql.LONGTEXT(), sa.Text())
    _alter(BLOBS, mysql.LONGBLOB(), sa.LargeBinary())


def downgrade() -> None:
    if not _mysql():
        return
    _alter(TIMESTAMPS, sa.DateTime(), mysql.DATETIME(fsp=6))
    _alter(TEXTS, sa.Text(), mysql.LONGTEXT())
    _alter(BLOBS, sa.LargeBinary(), mysql.LONGBLOB())
