"""The initial store: jobs and their executions, processes, pauses, bindings, results.

Revision ID: 0001
Revises:
Create Date: 2026-11-22

Frozen: later schema changes get a new revision, never an edit here.
"""
from alembic import context, op
import sqlalchemy as sa

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _prefix() -> str:
    """Every table name starts with the store's prefix (``table_prefix``)."""
    return context.config.attributes.get("table_prefix", "sqlq_")


#: 64-bit auto-increment key; SQLite auto-increments only ``INTEGER PRIMARY KEY``.
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

TABLES = ["jobs", "ready_executions", "scheduled_executions", "claimed_executions", "failed_executions",
          "processes", "pauses", "bindings", "results", "groups", "chords"]


def upgrade() -> None:
    p = _prefix()
    op.create_table(
        f"{p}jobs",
        sa.Column('id', Id, primary_key=True, autoincrement=True),
        sa.Column('queue_name', sa.String(255), nullable=False),
        sa.Column('task_name', sa.String(255)),
        sa.Column('task_id', sa.String(255)),
        sa.Column('priority', sa.Integer(), nullable=False),
        sa.Column('payload', sa.Text(), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('scheduled_at', sa.DateTime()),
        sa.Column('expires_at', sa.DateTime()),
        sa.Column('finished_at', sa.DateTime()),
        sa.Column('deliveries', sa.Integer(), nullable=False),
        sa.Column('releases', sa.Integer(), nullable=False),
    )
    op.create_index(f"ix_{p}jobs_finished_at", f"{p}jobs", ['finished_at'])
    op.create_index(f"ix_{p}jobs_queue_finished", f"{p}jobs", ['queue_name', 'finished_at'])
    op.create_index(f"ix_{p}jobs_task_id", f"{p}jobs", ['task_id'])
    op.create_table(
        f"{p}bindings",
        sa.Column('id', Id, primary_key=True, autoincrement=True),
        sa.Column('exchange', sa.String(255), nullable=False),
        sa.Column('queue_name', sa.String(255), nullable=False),
        sa.Column('routing_key', sa.String(255), nullable=False),
        sa.Column('expires_at', sa.DateTime()),
        sa.UniqueConstraint('exchange', 'queue_name', 'routing_key', name=f"uq_{p}binding"),
    )
    op.create_table(
        f"{p}chords",
        sa.Column('group_id', sa.String(255), primary_key=True),
        sa.Column('size', sa.Integer()),
        sa.Column('done', sa.Integer(), nullable=False),
        sa.Column('fired', sa.Boolean(), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
    )
    op.create_index(f"ix_{p}chords_created_at", f"{p}chords", ['created_at'])
    op.create_table(
        f"{p}groups",
        sa.Column('id', Id, primary_key=True, autoincrement=True),
        sa.Column('group_id', sa.String(255), nullable=False),
        sa.Column('content_type', sa.String(128), nullable=False),
        sa.Column('content_encoding', sa.String(64), nullable=False),
        sa.Column('payload', sa.LargeBinary(), nullable=False),
        sa.Column('date_done', sa.DateTime(), nullable=False),
        sa.UniqueConstraint('group_id', name=f"uq_{p}groups_group"),
    )
    op.create_index(f"ix_{p}groups_date_done", f"{p}groups", ['date_done'])
    op.create_table(
        f"{p}pauses",
        sa.Column('queue_name', sa.String(255), primary_key=True),
        sa.Column('created_at', sa.DateTime(), nullable=False),
    )
    op.create_table(
        f"{p}processes",
        sa.Column('id', Id, primary_key=True, autoincrement=True),
        sa.Column('kind', sa.String(32), nullable=False),
        sa.Column('name', sa.String(255), nullable=False),
        sa.Column('hostname', sa.String(255), nullable=False),
        sa.Column('pid', sa.Integer(), nullable=False),
        sa.Column('pool', sa.String(32)),
        sa.Column('concurrency', sa.Integer()),
        sa.Column('queues', sa.Text()),
        sa.Column('started_at', sa.DateTime(), nullable=False),
        sa.Column('last_heartbeat_at', sa.DateTime(), nullable=False),
    )
    op.create_index(f"ix_{p}processes_heartbeat", f"{p}processes", ['last_heartbeat_at'])
    op.create_table(
        f"{p}results",
        sa.Column('id', Id, primary_key=True, autoincrement=True),
        sa.Column('task_id', sa.String(255), nullable=False),
        sa.Column('status', sa.String(50), nullable=False),
        sa.Column('content_type', sa.String(128), nullable=False),
        sa.Column('content_encoding', sa.String(64), nullable=False),
        sa.Column('payload', sa.LargeBinary(), nullable=False),
        sa.Column('name', sa.String(255)),
        sa.Column('worker', sa.String(255)),
        sa.Column('retries', sa.Integer()),
        sa.Column('queue', sa.String(255)),
        sa.Column('group_id', sa.String(255)),
        sa.Column('date_done', sa.DateTime()),
        sa.Column('updated_at', sa.DateTime(), nullable=False),
        sa.UniqueConstraint('task_id', name=f"uq_{p}results_task"),
    )
    op.create_index(f"ix_{p}results_updated_at", f"{p}results", ['updated_at'])
    op.create_table(
        f"{p}claimed_executions",
        sa.Column('id', Id, primary_key=True, autoincrement=True),
        sa.Column('job_id', Id, sa.ForeignKey(f"{p}jobs.id", ondelete='CASCADE'), nullable=False),
        sa.Column('process_id', Id, nullable=False),
        sa.Column('queue_name', sa.String(255), nullable=False),
        sa.Column('claimed_at', sa.DateTime(), nullable=False),
        sa.Column('acked_at', sa.DateTime()),
        sa.UniqueConstraint('job_id', name=f"uq_{p}claimed_job"),
    )
    op.create_index(f"ix_{p}claimed_process", f"{p}claimed_executions", ['process_id', 'job_id'])
    op.create_table(
        f"{p}failed_executions",
        sa.Column('id', Id, primary_key=True, autoincrement=True),
        sa.Column('job_id', Id, sa.ForeignKey(f"{p}jobs.id", ondelete='CASCADE'), nullable=False),
        sa.Column('queue_name', sa.String(255), nullable=False),
        sa.Column('error_class', sa.String(255), nullable=False),
        sa.Column('error', sa.Text(), nullable=False),
        sa.Column('failed_at', sa.DateTime(), nullable=False),
        sa.UniqueConstraint('job_id', name=f"uq_{p}failed_job"),
    )
    op.create_index(f"ix_{p}failed_at", f"{p}failed_executions", ['failed_at'])
    op.create_table(
        f"{p}ready_executions",
        sa.Column('id', Id, primary_key=True, autoincrement=True),
        sa.Column('job_id', Id, sa.ForeignKey(f"{p}jobs.id", ondelete='CASCADE'), nullable=False),
        sa.Column('queue_name', sa.String(255), nullable=False),
        sa.Column('priority', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.UniqueConstraint('job_id', name=f"uq_{p}ready_job"),
    )
    op.create_index(f"ix_{p}ready_poll", f"{p}ready_executions", ['queue_name', sa.text('priority DESC'), 'job_id'])
    op.create_table(
        f"{p}scheduled_executions",
        sa.Column('id', Id, primary_key=True, autoincrement=True),
        sa.Column('job_id', Id, sa.ForeignKey(f"{p}jobs.id", ondelete='CASCADE'), nullable=False),
        sa.Column('queue_name', sa.String(255), nullable=False),
        sa.Column('priority', sa.Integer(), nullable=False),
        sa.Column('scheduled_at', sa.DateTime(), nullable=False),
        sa.UniqueConstraint('job_id', name=f"uq_{p}scheduled_job"),
    )
    op.create_index(f"ix_{p}scheduled_due", f"{p}scheduled_executions", ['scheduled_at', 'job_id'])


def downgrade() -> None:
    p = _prefix()
    for name in reversed(TABLES):
        op.drop_table(f"{p}{name}")
