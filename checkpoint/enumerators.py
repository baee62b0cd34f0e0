"""Enumerators: iterables of ``(item, cursor)`` pairs that can resume.

Every builder takes ``cursor=`` — the cursor of the last processed item, or
``None`` to start from the beginning — and yields the items *after* it.  All
cursors are plain JSON values (ints, strings, lists), so they travel in a
message header unchanged.

From a task, use them through ``self.enumerate``::

    def build_enumerator(self, account_id, *, cursor=None):
        return self.enumerate.sqlalchemy_batches(
            select(Order).where(Order.account_id == account_id),
            cursor=cursor, batch_size=500, bind=engine)
"""
from __future__ import annotations

import csv
import io
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Tuple

import sqlalchemy as sa
from sqlalchemy.orm import Session

__all__ = [
    "Enumerators",
    "integers", "sequence", "generator", "nested",
    "sqlalchemy_rows", "sqlalchemy_batches",
    "csv_rows", "csv_batches",
]

Pair = Tuple[Any, Any]


def integers(start: int, stop: int, step: int = 1, *, cursor: Optional[int] = None) -> Iterator[Pair]:
    """Integers in ``range(start, stop, step)``; the cursor is the integer itself.

    >>> list(integers(0, 5, cursor=2))
    [(3, 3), (4, 4)]
    """
    first = start if cursor is None else cursor + step
    for i in range(first, stop, step):
        yield i, i


def sequence(items: Sequence[Any], *, cursor: Optional[int] = None) -> Iterator[Pair]:
    """Items of a list (or any sequence); the cursor is the index.

    >>> list(sequence("abc", cursor=0))
    [('b', 1), ('c', 2)]
    """
    first = 0 if cursor is None else cursor + 1
    for index in range(first, len(items)):
        yield items[index], index


def generator(pairs: Iterable[Pair]) -> Iterator[Pair]:
    """Check that an arbitrary iterable really yields ``(item, cursor)`` pairs."""
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise TypeError(f"enumerators must yield (item, cursor) pairs, got {pair!r}")
        yield pair


def nested(builders: Sequence[Callable[..., Iterable[Pair]]], *, cursor: Optional[list] = None) -> Iterator[Pair]:
    """Iterate nested enumerators; yield the innermost items.

    ``builders[0](cursor=...)`` builds the outer enumerator; each following
    builder is called as ``builder(outer_item, cursor=...)``.  The cursor is a
    list with one entry per level: for outer levels, the cursor to *rebuild*
    the level at its current item (the previous item's cursor); for the
    innermost level, the cursor of the last processed item.

    >>> days = lambda cursor: sequence(["mon", "tue"], cursor=cursor)
    >>> hours = lambda day, cursor: integers(0, 2, cursor=cursor)
    >>> [c for _, c in nested([days, hours])]
    [[None, 0], [None, 1], [0, 0], [0, 1]]
    """
    if not builders:
        raise ValueError("nested() needs at least one enumerator builder")
    cursors = list(cursor) if cursor is not None else [None] * len(builders)
    if len(cursors) != len(builders):
        raise ValueError(f"nested cursor {cursor!r} has {len(cursors)} levels, expected {len(builders)}")
    yield from _nested_level(builders, cursors, 0, None)


def _nested_level(builders: Sequence[Callable[..., Iterable[Pair]]], cursors: list, depth: int, parent: Any) -> Iterator[Pair]:
    build = builders[depth]
    level = build(cursor=cursors[depth]) if depth == 0 else build(parent, cursor=cursors[depth])
    innermost = depth == len(builders) - 1
    if innermost:
        for item, item_cursor in level:
            yield item, cursors[:depth] + [item_cursor]
        return
    # Outer level: re-entering it with cursors[depth] yields the *current* item
    # again, so the inner level can continue where it stopped.
    for item, item_cursor in level:
        yield from _nested_level(builders, cursors, depth + 1, item)
        cursors[depth] = item_cursor
        for deeper in range(depth + 1, len(cursors)):
            cursors[deeper] = None


# -- SQLAlchemy keyset pagination --------------------------------------------

def _key_columns(stmt: sa.Select, columns: Optional[Sequence[Any]]) -> list:
    """The keyset columns: ``columns`` (objects or names) or the primary key."""
    entity = None
    descriptions = stmt.column_descriptions
    if descriptions:
        entity = descriptions[0].get("entity")
    table = None
    if entity is not None:
        table = sa.inspect(entity).local_table
    elif stmt.get_final_froms():
        table = stmt.get_final_froms()[0]
    if columns:
        resolved = []
        for col in columns:
            if isinstance(col, str):
                if table is None or col not in table.c:
                    raise ValueError(f"cannot find key column {col!r} in {table!r}")
                col = table.c[col]
            resolved.append(col)
        return resolved
    if table is None or not list(getattr(table, "primary_key", [])):
        raise ValueError("the select has no primary key to paginate by; pass columns=[...] (unique, ordered)")
    return list(table.primary_key)


def _after(key_cols: Sequence[Any], cursor: Sequence[Any]) -> Any:
    """``(a, b, c) > (x, y, z)`` spelled out, so every dialect can use the index."""
    clauses = []
    for i, col in enumerate(key_cols):
        equal = [key_cols[j] == cursor[j] for j in range(i)]
        clauses.append(sa.and_(*equal, col > cursor[i]))
    return sa.or_(*clauses)


def _keyset_batches(stmt: sa.Select, bind: Any, batch_size: int, cursor: Any, columns: Any) -> Iterator[Tuple[list, list]]:
    key_cols = _key_columns(stmt, columns)
    orm_entity = _single_orm_entity(stmt)
    if cursor is not None:
        cursor = list(cursor) if isinstance(cursor, (list, tuple)) else [cursor]
        if len(cursor) != len(key_cols):
            raise ValueError(f"cursor {cursor!r} does not match key columns {[c.key for c in key_cols]}")
    page = stmt.order_by(None).order_by(*key_cols).limit(batch_size)
    while True:
        query = page if cursor is None else page.where(_after(key_cols, cursor))
        rows = _fetch(bind, query, orm_entity)
        if not rows:
            return
        cursor = _key_of(rows[-1], key_cols, orm_entity)
        yield rows, cursor
        if len(rows) < batch_size:
            return


def _single_orm_entity(stmt: sa.Select) -> Any:
    descriptions = stmt.column_descriptions
    if len(descriptions) == 1 and descriptions[0].get("entity") is not None and descriptions[0].get("expr") is descriptions[0].get("entity"):
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


def _key_of(row: Any, key_cols: Sequence[Any], orm_entity: Any) -> list:
    if orm_entity is not None:
        mapper = sa.inspect(orm_entity)
        return [getattr(row, mapper.get_property_by_column(col).key) for col in key_cols]
    return [row._mapping[col] for col in key_cols]


def _require_bind(bind: Any) -> Any:
    if bind is None:
        raise TypeError("SQLAlchemy enumerators need bind= (an Engine, Connection or Session), "
                        "or set `enumerator_bind` on the task")
    return bind


def sqlalchemy_batches(stmt: sa.Select, *, bind: Any = None, cursor: Optional[list] = None,
                       batch_size: int = 100, columns: Optional[Sequence[Any]] = None) -> Iterator[Pair]:
    """Batches of rows from ``stmt``, paginated by keyset.

    Args:
        stmt: a ``select()``; its ORDER BY and LIMIT are replaced.
        bind: Engine, Connection or Session.  With ``select(Model)`` the items
            are ORM objects (expunged when an Engine is given), else Rows.
        cursor: the key values (a list) of the last row of the last batch.
        columns: unique, ordered key columns (objects or names); the primary key by default.

    Rows whose key changes while the job runs may be skipped or seen twice.
    """
    yield from _keyset_batches(stmt, _require_bind(bind), batch_size, cursor, columns)


def sqlalchemy_rows(stmt: sa.Select, *, bind: Any = None, cursor: Optional[list] = None,
                    batch_size: int = 100, columns: Optional[Sequence[Any]] = None) -> Iterator[Pair]:
    """Rows from ``stmt`` one at a time, fetched in keyset batches; cursor = the row's key values."""
    bind = _require_bind(bind)
    key_cols = _key_columns(stmt, columns)
    orm_entity = _single_orm_entity(stmt)
    for rows, _ in _keyset_batches(stmt, bind, batch_size, cursor, columns):
        for row in rows:
            yield row, _key_of(row, key_cols, orm_entity)


# -- CSV ----------------------------------------------------------------------

def csv_rows(path: str, *, cursor: Optional[int] = None, header: bool = True,
             encoding: str = "utf-8", **reader_options: Any) -> Iterator[Pair]:
    """Rows of a CSV file; the cursor is the byte offset just after the row.

    With ``header=True`` rows are dicts keyed by the first line.  Quoted
    fields spanning several lines are fine: the offset is taken after the
    reader has consumed the whole record (``csv.reader`` never reads ahead).
    The file must not change between runs: a byte offset means nothing in
    another file.
    """
    with open(path, "rb") as fh:
        lines = _OffsetLines(fh, encoding)
        fieldnames = None
        if header:
            fieldnames = next(csv.reader(lines, **reader_options), None)
            if fieldnames is None:
                return
        if cursor is not None:
            lines.seek(cursor)
        reader = csv.reader(lines, **reader_options)
        for record in reader:
            item = dict(zip(fieldnames, record)) if fieldnames is not None else record
            yield item, lines.offset


def csv_batches(path: str, *, cursor: Optional[int] = None, batch_size: int = 100, **options: Any) -> Iterator[Pair]:
    """Lists of up to ``batch_size`` CSV rows; cursor = byte offset after the batch."""
    batch: list = []
    offset = cursor
    for item, offset in csv_rows(path, cursor=cursor, **options):
        batch.append(item)
        if len(batch) == batch_size:
            yield batch, offset
            batch = []
    if batch:
        yield batch, offset


class _OffsetLines:
    """Decoded lines of a binary file, remembering the byte offset consumed so far."""

    def __init__(self, fh: io.BufferedReader, encoding: str) -> None:
        self.fh = fh
        self.encoding = encoding
        self.offset = fh.tell()

    def seek(self, offset: int) -> None:
        self.fh.seek(offset)
        self.offset = offset

    def __iter__(self) -> "_OffsetLines":
        return self

    def __next__(self) -> str:
        line = self.fh.readline()
        if not line:
            raise StopIteration
        self.offset += len(line)
        return line.decode(self.encoding)


# -- bound to a task -----------------------------------------------------------

class Enumerators:
    """``task.enumerate``: the builders above, with the task's ``enumerator_bind`` as default ``bind``."""

    def __init__(self, task: Any = None) -> None:
        self._task = task

    integers = staticmethod(integers)
    range = staticmethod(integers)
    sequence = staticmethod(sequence)
    generator = staticmethod(generator)
    nested = staticmethod(nested)
    csv_rows = staticmethod(csv_rows)
    csv_batches = staticmethod(csv_batches)

    def _bind(self, bind: Any) -> Any:
        if bind is None and self._task is not None:
            bind = getattr(self._task, "enumerator_bind", None)
            if callable(bind) and not isinstance(bind, (sa.Engine, sa.Connection, Session)):
                bind = bind()
        return bind

    def sqlalchemy_rows(self, stmt: sa.Select, *, bind: Any = None, **options: Any) -> Iterator[Pair]:
        return sqlalchemy_rows(stmt, bind=self._bind(bind), **options)

    def sqlalchemy_batches(self, stmt: sa.Select, *, bind: Any = None, **options: Any) -> Iterator[Pair]:
        return sqlalchemy_batches(stmt, bind=self._bind(bind), **options)
