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
import os
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Tuple

import sqlalchemy as sa
from sqlalchemy.orm import Session

from . import keyset
from .cursor import InvalidCursorError

__all__ = [
    "Enumerators", "Enumeration",
    "integers", "sequence", "generator", "nested",
    "sqlalchemy_rows", "sqlalchemy_batches",
    "csv_rows", "csv_batches",
]

Pair = Tuple[Any, Any]


class Enumeration:
    """An enumerator that can say how far along a cursor is (for progress views).

    Iterating it yields the ``(item, cursor)`` pairs of the wrapped iterator.
    :meth:`total_items` is the number of items of the whole enumeration when
    known (given, or counted by ``count`` on demand: the task asks once per
    job, not per run); ``fraction(cursor)`` the share done at ``cursor`` when
    the enumerator can tell it without counting items (a CSV file's byte
    offset), else ``None``.
    """

    def __init__(self, pairs: Iterable[Pair], total: Optional[int] = None,
                 fraction: Optional[Callable[[Any], Optional[float]]] = None,
                 count: Optional[Callable[[], int]] = None) -> None:
        self._pairs = pairs
        self._iterator: Optional[Iterator[Pair]] = None
        self.total = total
        self._count = count
        self._fraction = fraction

    def total_items(self) -> Optional[int]:
        if self.total is None and self._count is not None:
            self.total = self._count()
        return self.total

    def __iter__(self) -> Iterator[Pair]:
        if self._iterator is None:
            self._iterator = iter(self._pairs)
        return self._iterator

    def __next__(self) -> Pair:
        return next(iter(self))

    def fraction(self, cursor: Any) -> Optional[float]:
        return self._fraction(cursor) if self._fraction is not None else None

    def close(self) -> None:
        close = getattr(self._iterator if self._iterator is not None else self._pairs, "close", None)
        if close is not None:
            close()


def _int_cursor(cursor: Any, what: str) -> int:
    if isinstance(cursor, bool) or not isinstance(cursor, int):
        raise InvalidCursorError(f"{what} cursor must be an int, got {cursor!r}")
    return cursor


def integers(start: int, stop: int, step: int = 1, *, cursor: Optional[int] = None) -> Enumeration:
    """Integers in ``range(start, stop, step)``; the cursor is the integer itself.

    A cursor that is not a member of the range is an :class:`InvalidCursorError`:
    resuming from it would skip or repeat items.

    >>> list(integers(0, 5, cursor=2))
    [(3, 3), (4, 4)]
    """
    numbers = range(start, stop, step)
    if cursor is None:
        first = 0
    else:
        if _int_cursor(cursor, "integers()") not in numbers:
            raise InvalidCursorError(
                f"cursor {cursor!r} is not in range({start}, {stop}, {step}); a cursor is the last processed "
                "integer, so it must be one of the range's members (pass cursor=None to start at the beginning)")
        first = numbers.index(cursor) + 1
    return Enumeration(((i, i) for i in numbers[first:]), total=len(numbers))


def sequence(items: Sequence[Any], *, cursor: Optional[int] = None) -> Enumeration:
    """Items of a list (or any sequence); the cursor is the index.

    >>> list(sequence("abc", cursor=0))
    [('b', 1), ('c', 2)]
    """
    if cursor is None:
        first = 0
    else:
        if not 0 <= _int_cursor(cursor, "sequence()") < len(items):
            raise InvalidCursorError(
                f"cursor {cursor!r} is not an index of the sequence (0..{len(items) - 1}); a cursor is the index "
                "of the last processed item: did the sequence change between runs?")
        first = cursor + 1
    return Enumeration(((items[i], i) for i in range(first, len(items))), total=len(items))


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


# -- SQLAlchemy keyset pagination (see checkpoint.keyset) ------------------------

def _require_bind(bind: Any) -> Any:
    if bind is None:
        raise TypeError("SQLAlchemy enumerators need bind= (an Engine, Connection or Session), "
                        "or set `enumerator_bind` on the task")
    return bind


def sqlalchemy_batches(stmt: sa.Select, *, bind: Any = None, cursor: Optional[list] = None,
                       batch_size: int = 100, columns: Optional[Sequence[Any]] = None) -> Enumeration:
    """Batches of rows from ``stmt``, paginated by keyset.

    Args:
        stmt: a ``select()``; its ORDER BY and LIMIT are replaced.
        bind: Engine, Connection or Session.  With ``select(Model)`` the items
            are ORM objects (expunged when an Engine is given), else Rows.
        cursor: the key values (a list) of the last row of the last batch.
        columns: ordered key columns (objects or names); the primary key by
            default.  The primary key is appended when missing, so a
            non-unique column (a timestamp) still walks every row once.

    Key values of type datetime, date, time, Decimal and UUID are carried in
    the cursor as strings and bound with the column's type.  Rows whose key
    changes while the job runs may be skipped or seen twice.
    """
    bind = _require_bind(bind)
    pairs = keyset.batches(stmt, bind, batch_size, cursor, columns)
    return Enumeration(pairs, count=lambda: -(-keyset.count_rows(stmt, bind) // batch_size))


def sqlalchemy_rows(stmt: sa.Select, *, bind: Any = None, cursor: Optional[list] = None,
                    batch_size: int = 100, columns: Optional[Sequence[Any]] = None) -> Enumeration:
    """Rows from ``stmt`` one at a time, fetched in keyset batches; cursor = the row's key values."""
    bind = _require_bind(bind)
    key_cols = keyset.key_columns(stmt, columns)
    orm_entity = keyset.single_orm_entity(stmt)

    def pairs() -> Iterator[Pair]:
        for rows, _ in keyset.batches(stmt, bind, batch_size, cursor, columns):
            for row in rows:
                yield row, keyset.key_of(row, key_cols, orm_entity)

    return Enumeration(pairs(), count=lambda: keyset.count_rows(stmt, bind))


# -- CSV ----------------------------------------------------------------------

def _file_fraction(path: str) -> Callable[[Any], Optional[float]]:
    size = os.path.getsize(path)
    return lambda cursor: (cursor / size if size else 1.0) if isinstance(cursor, int) else None


def _check_offset(path: str, cursor: Any) -> None:
    if cursor is None:
        return
    size = os.path.getsize(path)
    if isinstance(cursor, bool) or not isinstance(cursor, int) or not 0 <= cursor <= size:
        raise InvalidCursorError(f"CSV cursor {cursor!r} is not a byte offset within {path} (0..{size}); "
                                 "did the file change between runs?")


def csv_rows(path: str, *, cursor: Optional[int] = None, header: bool = True,
             encoding: str = "utf-8", **reader_options: Any) -> Enumeration:
    """Rows of a CSV file; the cursor is the byte offset just after the row.

    With ``header=True`` rows are dicts keyed by the first line.  Quoted
    fields spanning several lines are fine: the offset is taken after the
    reader has consumed the whole record (``csv.reader`` never reads ahead).
    The file must not change between runs: a byte offset means nothing in
    another file.  Progress is the share of the file's bytes read.
    """
    _check_offset(path, cursor)
    return Enumeration(_csv_rows(path, cursor, header, encoding, reader_options), fraction=_file_fraction(path))


def _csv_rows(path: str, cursor: Optional[int], header: bool, encoding: str,
              reader_options: dict) -> Iterator[Pair]:
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


def csv_batches(path: str, *, cursor: Optional[int] = None, batch_size: int = 100, **options: Any) -> Enumeration:
    """Lists of up to ``batch_size`` CSV rows; cursor = byte offset after the batch."""
    rows = csv_rows(path, cursor=cursor, **options)
    return Enumeration(_batched(rows, cursor, batch_size), fraction=rows.fraction)


def _batched(rows: Iterable[Pair], cursor: Any, batch_size: int) -> Iterator[Pair]:
    batch: list = []
    offset = cursor
    for item, offset in rows:
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
