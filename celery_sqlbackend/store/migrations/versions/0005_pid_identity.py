"""processes.pid_identity: what identifies a registered process's run of its PID.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

A pruner on the same host prunes a process whose PID no longer runs (or runs
another program) at once, instead of after ``alive_threshold``; see
``celery_sqlbackend.pid_identity``.  Nullable: rows of workers started before
this revision, or on platforms that cannot tell, are pruned by heartbeat age.
Tables SQLite created already with the column are left alone.

Frozen: later schema changes get a new revision, never an edit here.
"""
from alembic import context, op
import sqlalchemy as sa

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _table() -> str:
    return f"{context.config.attributes.get('table_prefix', 'sqlq_')}processes"


def upgrade() -> None:
    if not context.is_offline_mode():
        present = {c["name"] for c in sa.inspect(op.get_bind()).get_columns(_table())}
        if "pid_identity" in present:
            return
    op.add_column(_table(), sa.Column("pid_identity", sa.String(255)))


def downgrade() -> None:
    op.drop_column(_table(), "pid_identity")
