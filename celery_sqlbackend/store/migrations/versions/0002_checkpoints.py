"""checkpoint's table: durable cursors and progress of iterative jobs.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

Before this revision ``checkpoint`` created ``sqlq_checkpoints`` itself at run
time (task_id, cursor, counters, updated_at), which needs DDL rights a
production role should not have.  A table left by that code is upgraded in
place (the missing columns are added), so saved cursors survive the upgrade;
a database whose tables SQLite created already at this layout is left alone.

Frozen: later schema changes get a new revision, never an edit here.
"""
from alembic import context, op
import sqlalchemy as sa

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _prefix() -> str:
    return context.config.attributes.get("table_prefix", "sqlq_")


def _columns() -> list:
    return [
        sa.Column("task_id", sa.String(255), primary_key=True),
        sa.Column("task_name", sa.String(255)),
        sa.Column("state", sa.String(16), nullable=False, server_default="running"),
        sa.Column("cursor", sa.Text()),
        sa.Column("counters", sa.Text(), nullable=False),
        sa.Column("iterations", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("total", sa.BigInteger()),
        sa.Column("fraction", sa.Float()),
        sa.Column("error", sa.Text()),
        sa.Column("started_at", sa.DateTime()),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime()),
    ]


def upgrade() -> None:
    p = _prefix()
    name = f"{p}checkpoints"
    index = f"ix_{p}checkpoints_updated_at"
    # Offline (``migrate --sql``) there is nothing to inspect: render the CREATE.
    inspector = None if context.is_offline_mode() else sa.inspect(op.get_bind())
    if inspector is None or not inspector.has_table(name):
        op.create_table(name, *_columns())
        op.create_index(index, name, ["updated_at"])
        return
    present = {c["name"] for c in inspector.get_columns(name)}
    for column in _columns():
        if column.name not in present:
            op.add_column(name, column)
    if index not in {i["name"] for i in inspector.get_indexes(name)}:
        op.create_index(index, name, ["updated_at"])


def downgrade() -> None:
    op.drop_table(f"{_prefix()}checkpoints")
