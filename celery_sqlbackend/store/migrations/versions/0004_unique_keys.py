"""Unique jobs: the table of held keys (``sqlq_unique``).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

Frozen: later schema changes get a new revision, never an edit here.
"""
from alembic import op
import sqlalchemy as sa

from celery_sqlbackend.store.migrations.revision_support import Id, Ts, already_created, table_prefix

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    p = table_prefix()
    # A table SQLite's create path made already (a database adopted by ``migrate``) is left alone.
    if already_created(f"{p}unique_keys"):
        return
    op.create_table(
        f"{p}unique_keys",
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("task_id", sa.String(255), nullable=False),
        sa.Column("job_id", Id, sa.ForeignKey(f"{p}jobs.id", ondelete="CASCADE")),
        sa.Column("held_until", sa.String(16)),
        sa.Column("expires_at", Ts),
        sa.Column("created_at", Ts, nullable=False),
    )
    op.create_index(f"ix_{p}unique_keys_job", f"{p}unique_keys", ["job_id"])
    op.create_index(f"ix_{p}unique_keys_expires", f"{p}unique_keys", ["expires_at"])


def downgrade() -> None:
    op.drop_table(f"{table_prefix()}unique_keys")
