"""What every revision in ``versions/`` needs: the table prefix, the key and time types, "made already?".

Revisions are frozen once released, and so is what they import from here: a helper's meaning never
changes (a new need gets a new helper), or old revisions would build different schemas.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import mysql

#: 64-bit auto-increment key, as ``jobs.id``; SQLite auto-increments only ``INTEGER PRIMARY KEY``.
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

#: Microsecond timestamps on MySQL/MariaDB too (their DATETIME keeps whole seconds by default).
Ts = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def table_prefix() -> str:
    """Every table name starts with the store's prefix (``table_prefix``, from ``migrate``)."""
    return context.config.attributes.get("table_prefix", "sqlq_")


def already_created(table: str) -> bool:
    """``table`` (a full name) exists already: SQLite's create path made it, and ``migrate`` adopts
    that database.  Offline (``migrate --sql``) there is nothing to inspect: False, render the CREATE."""
    return not context.is_offline_mode() and sa.inspect(op.get_bind()).has_table(table)
