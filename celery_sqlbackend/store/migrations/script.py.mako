"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}
"""
from alembic import context, op
import sqlalchemy as sa
${imports if imports else ""}

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}


def _prefix() -> str:
    """Every table name starts with the store's prefix (``table_prefix``)."""
    return context.config.attributes.get("table_prefix", "sqlq_")


def upgrade() -> None:
    p = _prefix()
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    p = _prefix()
    ${downgrades if downgrades else "pass"}
