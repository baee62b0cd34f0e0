"""Keyset pagination over a SQLAlchemy ``select()``, with cursors that JSON can carry.

Why keyset and not OFFSET: a job that resumes hours later must start after the
last row it processed, whatever was inserted or deleted meanwhile, and each
page must be an index range scan.

Two traps this module closes:

* **Typed keys.**  A cursor travels as JSON, so a ``datetime``, ``date``,
  ``time``, ``Decimal`` or ``UUID`` key is encoded as its ISO/str form
  (:func:`encode_key`) and decoded back with the key column's Python type
  before it is bound (:func:`decode_key`): PostgreSQL refuses
  ``timestamp > varchar``, and SQLite's DateTime accepts only datetimes.
* **Non-unique keys.**  Ordering by a column that repeats (``created_at``)
  and resuming "after" its last value skips the rows that share it.  The
  primary key is appended as a tie-breaker (as job-iteration does), so the
  order is total and each row is seen exactly once.
"""
from __future__ import annotations

import datetime as dt
import decimal
import uuid
from typing import Any, Iterator, Optional, Sequence, Tuple

import sqlalchemy as sa
from sqlalchemy.orm import Session

from .cursor import InvalidCursorError

__all__ = ["encode_key", "decode_key", "key_columns", "batches", "key_of", "single_orm_entity", "count_rows"]


def encode_key(value: Any) -> Any:
    """A key value as a JSON value that :func:`decode_key` turns back into it."""
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, (decimal.Decimal, uuid.UUID)):
        return str(value)
    if value is None or isinstance(value, (str, int, float)):
        return value
    raise InvalidCursorError(
        f"key value {value!r} of type {type(value).__name__} cannot be carried in a cursor; "
        "paginate by columns of type int, str, float, datetime, date, time, Decimal or UUID")


def _python_type(column: Any) -> Optional[type]:
    try:
        return column.type.python_type
    except (NotImplementedError, AttributeError):
        return None


def decode_key(value: Any, column: Any) -> Any:
    """``value`` (from a cursor) as the Python type of ``column``, so it binds with the column's type."""
    wanted = _python_type(column)
    if value is None or wanted is None or (isinstance(value, wanted) and not isinstance(value, bool)):
        return value
    try:
        if wanted is dt.datetime:
            return dt.datetime.fromisoformat(value)
        if wanted is dt.date:
            return dt.date.fromisoformat(value)
        if wanted is dt.time:
            return dt.time.fromisoformat(value)
        if wanted is decimal.Decimal:
            return decimal.Decimal(str(value))
        if wanted is uuid.UUID:
            return uuid.UUID(str(value))
        if wanted in (int, float) and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return wanted(value)
    except (TypeError, ValueError, decimal.InvalidOperation) as exc:
        raise InvalidCursorError(
            f"cursor value {value!r} is not a valid {wanted.__name__} for key column {column.key!r}: {exc}") from exc
    return value


def _table_of(stmt: sa.Select) -> Any:
    descriptions = stmt.column_descriptions
    entity = descriptions[0].get("entity") if descriptions else None
    if entity is not None:
        return sa.inspect(entity).local_table
    froms = stmt.get_final_froms()
    return froms[0] if froms else None


def key_columns(stmt: sa.Select, columns: Optional[Sequence[Any]]) -> list:
    """The keyset columns: ``columns`` (objects or names) then the primary key columns not among them."""
    table = _table_of(stmt)
    primary_key = list(getattr(table, "primary_key", None) or [])
    if not columns:
        if not primary_key:
            raise ValueError("the select has no primary key to paginate by; pass columns=[...] (unique, ordered)")
        return primary_key
    resolved = []
    for col in columns:
        if isinstance(col, str):
            if table is None or col not in table.c:
                raise ValueError(f"cannot find key column {col!r} in {table!r}")
            col = table.c[col]
        elif hasattr(col, "__clause_element__"):
            col = col.__clause_element__()
        resolved.append(col)
    names = {c.key for c in resolved}
    return resolved + [pk for pk in primary_key if pk.key not in names]


def _after(key_cols: Sequence[Any], cursor: Sequence[Any]) -> Any:
    """``(a, b, c) > (x, y, z)`` spelled out, so every dialect can use the index.

    A cursor shorter than the key (a hand-made ``[created_at]``, or one saved
    before the primary key was appended) compares on its prefix: rows after it.
    """
    values = [sa.bindparam(None, decode_key(v, col), type_=col.type) for v, col in zip(cursor, key_cols)]
    clauses = []
    for i in range(len(values)):
        equal = [key_cols[j] == values[j] for j in range(i)]
        clauses.append(sa.and_(*equal, key_cols[i] > values[i]))
    return sa.or_(*clauses)


def single_orm_entity(stmt: sa.Select) -> Any:
    descriptions = stmt.column_descriptions
    if (len(descriptions) == 1 and descriptions[0].get("entity") is not None
            and descriptions[0].get("expr") is descriptions[0].get("entity")):
        return descriptions[0]["entity"]
    return None


def _fetch(bind: Any, query: sa.Select, orm_entity: Any) -> list:
    if isinstance(bind, Session):
        return list(bind.scalars(query)) if orm_entity is not None else list(bind.execute(query))
    if orm_entity is not None:
        with Session(bind) as session:
            objects = list(session.scalars(query))
            session.expunge_all()
            return objects
    if isinstance(bind, sa.Engine):
        with bind.connect() as conn:
            return list(conn.execute(query))
    return list(bind.execute(query))


def key_of(row: Any, key_cols: Sequence[Any], orm_entity: Any) -> list:
    """The encoded key of ``row``: the cursor that resumes after it."""
    if orm_entity is not None:
        mapper = sa.inspect(orm_entity)
        values = [getattr(row, mapper.get_property_by_column(col).key) for col in key_cols]
    else:
        values = [row._mapping[col] for col in key_cols]
    for col, value in zip(key_cols, values):
        if value is None:
            raise InvalidCursorError(f"key column {col.key!r} is NULL in a row; keyset pagination needs "
                                     "NOT NULL key columns (filter NULLs out, or paginate by other columns)")
    return [encode_key(v) for v in values]


def _normalise_cursor(cursor: Any, key_cols: Sequence[Any]) -> Optional[list]:
    if cursor is None:
        return None
    cursor = list(cursor) if isinstance(cursor, (list, tuple)) else [cursor]
    if not 1 <= len(cursor) <= len(key_cols):
        raise InvalidCursorError(
            f"cursor {cursor!r} does not match the key columns {[c.key for c in key_cols]} "
            "(give one value per column, in order)")
    return cursor


def batches(stmt: sa.Select, bind: Any, batch_size: int, cursor: Any,
            columns: Any) -> Iterator[Tuple[list, list]]:
    """``(rows, cursor of the last row)`` pages of ``stmt`` after ``cursor``."""
    key_cols = key_columns(stmt, columns)
    orm_entity = single_orm_entity(stmt)
    cursor = _normalise_cursor(cursor, key_cols)
    page = stmt.order_by(None).order_by(*key_cols).limit(batch_size)
    while True:
        query = page if cursor is None else page.where(_after(key_cols, cursor))
        rows = _fetch(bind, query, orm_entity)
        if not rows:
            return
        cursor = key_of(rows[-1], key_cols, orm_entity)
        yield rows, cursor
        if len(rows) < batch_size:
            return


def count_rows(stmt: sa.Select, bind: Any) -> int:
    """How many rows ``stmt`` selects (for progress totals; one COUNT query)."""
    query = sa.select(sa.func.count()).select_from(stmt.order_by(None).limit(None).subquery())
    if isinstance(bind, Session):
        return int(bind.scalar(query))
    if isinstance(bind, sa.Engine):
        with bind.connect() as conn:
            return int(conn.scalar(query))
    return int(bind.scalar(query))
