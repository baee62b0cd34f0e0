"""Small SQL building blocks shared by the statement modules of the store.

Nothing here knows about jobs or workers: prebuilt statements, id lists bound
as one parameter, and batched deletes.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Iterator, Sequence, TypeVar

from sqlalchemy import (ARRAY, Connection, Executable, String, TypeDecorator, any_, bindparam, cast, delete, func,
                        select)

from .dialects import Dialect
from .schema import Tables

E = TypeVar("E", bound=Executable)
T = TypeVar("T")


def prebuilt(t: Tables, d: Dialect, name: str, build: Callable[[], E]) -> E:
    """A statement of the claim loop, built once per store and dialect.

    Why: building a Core statement and its cache key costs a busy worker more
    CPU than SQLite takes to run it, and the worker's main process is
    CPU-bound.  Values go in as bind parameters (one parameter for a list: ``in_ids``).
    """
    key = (name, d.name)
    stmt = t.prebuilt.get(key)
    if stmt is None:
        stmt = t.prebuilt[key] = build()
    return stmt  # type: ignore[return-value]


def in_ids(col: Any, d: Dialect, name: str = "ids") -> Any:
    """``col IN (the list bound as name)``, bound as ``Dialect.id_list`` says."""
    if d.id_list == "array":
        return col == any_(bindparam(name, type_=ARRAY(col.type)))
    if d.id_list == "json":
        return col.in_(select(func.json_each(bindparam(name, type_=JsonList())).table_valued("value").c.value))
    return col.in_(bindparam(name, expanding=True))


def by_keys(column: Any) -> Any:
    """``= ANY(ARRAY(SELECT column …))`` (PostgreSQL): the rows of a CTE's keys, looked up one key at a
    time whatever the statistics say.  A join to the CTE instead was planned, from statistics taken while
    the tables were small, as a scan of the whole table, dead rows included."""
    return any_(cast(select(func.array_agg(column)).scalar_subquery(), ARRAY(column.type)))


class JsonList(TypeDecorator):
    """A list of ids bound as one JSON text (for ``json_each``)."""
    impl = String
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return json.dumps(list(value))


def delete_batch(conn: Connection, key: Any, *conditions: Any, limit: int) -> int:
    """Delete up to ``limit`` rows of ``key``'s table matching ``conditions``; returns how many.

    For clearing history: callers loop until fewer than ``limit`` come back, so
    each transaction stays short and never holds a long lock.
    """
    ids = list(conn.execute(select(key).where(*conditions).limit(limit)).scalars())
    if ids:
        conn.execute(delete(key.table).where(key.in_(ids)))
    return len(ids)


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def by_process(claims: Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    """``(job_id, process_id)`` pairs grouped as ``{process_id: [job_id, …]}``."""
    grouped: dict[int, list[int]] = {}
    for job_id, process_id in claims:
        grouped.setdefault(process_id, []).append(job_id)
    return grouped
