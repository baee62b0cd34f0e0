"""A table whose keys are typed (datetime, date, Decimal, UUID) and not unique, for keyset tests.

Imported by the test process (to seed it) and by ckapp in the worker (to walk it).
"""
from __future__ import annotations

import datetime as dt
import decimal
import functools
import uuid

import sqlalchemy as sa

metadata = sa.MetaData()

typed_rows = sa.Table(
    "ck_typed_rows", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("created", sa.DateTime, nullable=False),      # 7 rows share each value
    sa.Column("day", sa.Date, nullable=False),              # 50 rows share each value
    sa.Column("amount", sa.Numeric(12, 2), nullable=False),  # unique
    sa.Column("uid", sa.Uuid, nullable=False),               # unique
)

KEYS = {"created": ["created"], "day": ["day"], "amount": ["amount"], "uid": ["uid"], "created+uid": ["created", "uid"]}


def key_columns(key: str) -> list:
    return [typed_rows.c[name] for name in KEYS[key]]


def select_all() -> sa.Select:
    return sa.select(typed_rows)


@functools.lru_cache(maxsize=None)
def engine(url: str) -> sa.Engine:
    return sa.create_engine(url, poolclass=sa.pool.NullPool)


def seed(url: str, n: int) -> None:
    base = dt.datetime(2024, 2, 28, 23, 0, 0)
    rows = [{"id": i, "created": base + dt.timedelta(seconds=(i * 7919 % n) // 7),
             "day": dt.date(2024, 1, 1) + dt.timedelta(days=(i * 31 % n) // 50),
             "amount": decimal.Decimal(i * 7 % n) / 4,  # two decimals at most: SQLite keeps what it is given
             "uid": uuid.UUID(int=(i * 2654435761) % (1 << 128))} for i in range(n)]
    eng = sa.create_engine(url)
    try:
        metadata.create_all(eng)
        with eng.begin() as conn:
            conn.execute(sa.insert(typed_rows), rows)
    finally:
        eng.dispose()
