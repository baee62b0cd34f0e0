"""Recurring tasks: their definitions and one row per enqueued slot (celery_sqlbackend.beat).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

Frozen: later schema changes get a new revision, never an edit here.
"""
from alembic import op
import sqlalchemy as sa

from celery_sqlbackend.store.migrations.revision_support import Id, Ts, already_created, table_prefix

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    p = table_prefix()
    # Tables SQLite's create path made already (a database adopted by ``migrate``) are left alone.
    if already_created(f"{p}recurring_tasks"):
        return
    op.create_table(
        f"{p}recurring_tasks",
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("task", sa.String(255), nullable=False),
        sa.Column("schedule", sa.Text(), nullable=False),
        sa.Column("args", sa.Text(), nullable=False),
        sa.Column("kwargs", sa.Text(), nullable=False),
        sa.Column("options", sa.Text(), nullable=False),
        sa.Column("missed", sa.String(16), nullable=False),
        sa.Column("catch_up", sa.Integer(), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("declared", sa.Boolean(), nullable=False),
        sa.Column("since_at", Ts, nullable=False),
        sa.Column("last_slot_at", Ts),
        sa.Column("last_run_at", Ts),
        sa.Column("last_task_id", sa.String(255)),
        sa.Column("created_at", Ts, nullable=False),
        sa.Column("updated_at", Ts, nullable=False),
    )
    op.create_table(
        f"{p}recurring_executions",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("task_key", sa.String(255), nullable=False),
        sa.Column("slot_at", Ts, nullable=False),
        sa.Column("task_id", sa.String(255), nullable=False),
        sa.Column("manual", sa.Boolean(), nullable=False),
        sa.Column("created_at", Ts, nullable=False),
        sa.UniqueConstraint("task_key", "slot_at", name=f"uq_{p}recurring_slot"),
    )
    op.create_index(f"ix_{p}recurring_executions_created", f"{p}recurring_executions", ["created_at"])


def downgrade() -> None:
    p = table_prefix()
    op.drop_table(f"{p}recurring_executions")
    op.drop_table(f"{p}recurring_tasks")
