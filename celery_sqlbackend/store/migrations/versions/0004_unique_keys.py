"""Unique jobs: the table of held keys (``sqlq_unique``).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

Frozen: later schema changes get a new revision, never an edit here.
"""
from alembic import context, op
import sqlalchemy as sa
from sqlalchemy.dialects import mysql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")   # as jobs.id
Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")   # as schema.py (0003)


def _prefix() -> str:
    return context.config.attributes.get("table_prefix", "sqlq_")


def upgrade() -> None:
    p = _prefix()
    # A table SQLite's create path made already (a database adopted by ``migrate``) is left alone.
    if not context.is_offline_mode() and sa.inspect(op.get_bind()).has_table(f"{p}unique_keys"):
        return
    op.create_table(
        f"{p}unique_keys",
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("task_id", sa.String(255), nullable=False),
        sa.Column("job_id", Id, sa.ForeignKey(f"{p}jobs.id", ondelete="CASCADE")),
        sa.Column("held_until", sa.String(16)),
        sa.Column("expires_at", Timestamp),
        sa.Column("created_at", Timestamp, nullable=False),
    )
    op.create_index(f"ix_{p}unique_keys_job", f"{p}unique_keys", ["job_id"])
    op.create_index(f"ix_{p}unique_keys_expires", f"{p}unique_keys", ["expires_at"])


def downgrade() -> None:
    op.drop_table(f"{_prefix()}unique_keys")
