"""Limits (celery_sqlbackend.limits): job limits, semaphores and their holds, blocked executions, rate keys.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02

Frozen: later schema changes get a new revision, never an edit here.
"""
from alembic import op
import sqlalchemy as sa

from celery_sqlbackend.store.migrations.revision_support import Id, Ts, already_created, table_prefix

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    p = table_prefix()
    # Tables SQLite's create path made already (a database adopted by ``migrate``) are left alone.
    if already_created(f"{p}semaphores"):
        return
    op.create_table(
        f"{p}job_limits",
        sa.Column("job_id", Id, sa.ForeignKey(f"{p}jobs.id", ondelete="CASCADE"), primary_key=True,
                  autoincrement=False),
        sa.Column("concurrency_key", sa.String(255)),
        sa.Column("concurrency_limit", sa.Integer()),
        sa.Column("concurrency_duration", sa.Float()),
        sa.Column("rate_key", sa.String(255)),
        sa.Column("rate_limit", sa.Integer()),
        sa.Column("rate_period", sa.Float()),
    )
    op.create_table(
        f"{p}semaphores",
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("slots", sa.Integer(), nullable=False),
        sa.Column("updated_at", Ts, nullable=False),
    )
    op.create_table(
        f"{p}semaphore_holds",
        sa.Column("job_id", Id, primary_key=True, autoincrement=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("expires_at", Ts, nullable=False),
    )
    op.create_index(f"ix_{p}semaphore_holds_key", f"{p}semaphore_holds", ["key", "expires_at"])
    op.create_index(f"ix_{p}semaphore_holds_expires", f"{p}semaphore_holds", ["expires_at"])
    op.create_table(
        f"{p}blocked_executions",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("job_id", Id, sa.ForeignKey(f"{p}jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("queue_name", sa.String(255), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("created_at", Ts, nullable=False),
        sa.UniqueConstraint("job_id", name=f"uq_{p}blocked_job"),
    )
    op.create_index(f"ix_{p}blocked_next", f"{p}blocked_executions",
                    ["kind", "key", sa.text("priority DESC"), "job_id"])
    op.create_index(f"ix_{p}blocked_queue", f"{p}blocked_executions", ["queue_name"])
    op.create_table(
        f"{p}rate_keys",
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("max_starts", sa.Integer(), nullable=False),
        sa.Column("period", sa.Float(), nullable=False),
        sa.Column("starts", sa.Text(), nullable=False),
        sa.Column("next_open", Ts),
        sa.Column("updated_at", Ts, nullable=False),
    )
    op.create_index(f"ix_{p}rate_keys_next_open", f"{p}rate_keys", ["next_open"])


def downgrade() -> None:
    p = table_prefix()
    for table in ("rate_keys", "blocked_executions", "semaphore_holds", "semaphores", "job_limits"):
        op.drop_table(f"{p}{table}")
