"""Enumerators: every cursor they yield resumes exactly after its item."""
from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from checkpoint import enumerators as en
from checkpoint.cursor import validate_cursor


def _plain(item):
    if isinstance(item, list):
        return [_plain(i) for i in item]
    if isinstance(item, Base):
        return ("orm", item.id)
    if isinstance(item, sa.Row):
        return tuple(item)
    return item


def assert_resumable(build):
    """Resuming from the cursor of item k yields exactly items k+1.. of a full run."""
    full = list(build(None))
    for k, (_, cursor) in enumerate(full):
        validate_cursor(cursor)
        cursor = json.loads(json.dumps(cursor))  # as it comes back from a message header
        resumed = [_plain(item) for item, _ in build(cursor)]
        assert resumed == [_plain(item) for item, _ in full[k + 1:]], f"resume after #{k}"
    return full


def test_integers_and_sequence():
    assert [i for i, _ in assert_resumable(lambda c: en.integers(0, 7, 2, cursor=c))] == [0, 2, 4, 6]
    assert [i for i, _ in assert_resumable(lambda c: en.sequence(list("abcd"), cursor=c))] == list("abcd")
    assert list(en.sequence([], cursor=None)) == []


def test_generator_checks_pairs():
    assert list(en.generator(iter([(1, 1)]))) == [(1, 1)]
    with pytest.raises(TypeError, match=r"\(item, cursor\) pairs"):
        list(en.generator([1, 2]))


def test_nested_resumes_at_every_level():
    outer = lambda cursor: en.sequence(["a", "b", "c"], cursor=cursor)  # noqa: E731
    inner = lambda parent, cursor: en.integers(0, {"a": 2, "b": 0, "c": 3}[parent], cursor=cursor)  # noqa: E731
    middle = lambda parent, cursor: en.sequence([parent + "1", parent + "2"], cursor=cursor)  # noqa: E731
    full = assert_resumable(lambda c: en.nested([outer, inner], cursor=c))
    assert [i for i, _ in full] == [0, 1, 0, 1, 2]
    three = assert_resumable(lambda c: en.nested([outer, middle, lambda p, cursor: en.sequence([p + "x", p + "y"], cursor=cursor)], cursor=c))
    assert [i for i, _ in three][:3] == ["a1x", "a1y", "a2x"] and len(three) == 12
    with pytest.raises(ValueError, match="levels"):
        list(en.nested([outer, inner], cursor=[None]))


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    account: Mapped[int]
    placed: Mapped[str] = mapped_column(sa.String(10))   # (MySQL needs a VARCHAR length)


@pytest.fixture
def engine(db_url):
    engine = sa.create_engine(db_url)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        # ids not in insertion order, and a non-unique column for composite keys
        s.add_all(Order(id=i * 7 % 23 + 1, account=i % 3, placed=f"2026-01-{i % 5 + 1:02d}") for i in range(23))
        s.commit()
    yield engine
    engine.dispose()


def test_sqlalchemy_rows_orm_by_primary_key(engine):
    stmt = sa.select(Order).where(Order.account != 1)
    full = assert_resumable(lambda c: en.sqlalchemy_rows(stmt, bind=engine, cursor=c, batch_size=4))
    ids = [o.id for o, _ in full]
    assert ids == sorted(ids) and len(ids) == 15 and all(isinstance(o, Order) for o, _ in full)
    assert full[0][1] == [ids[0]]


def test_sqlalchemy_batches_core_with_composite_columns(engine):
    table = Order.__table__
    stmt = sa.select(table.c.id, table.c.placed)
    full = assert_resumable(lambda c: en.sqlalchemy_batches(stmt, bind=engine, cursor=c, batch_size=5,
                                                            columns=["placed", "id"]))
    keys = [(r.placed, r.id) for batch, _ in full for r in batch]
    assert keys == sorted(keys) and len(keys) == 23
    assert [len(b) for b, _ in full] == [5, 5, 5, 5, 3]
    assert full[0][1] == list(keys[4])


def test_sqlalchemy_with_session_and_connection(engine):
    with Session(engine) as session:
        assert len([o for o, _ in en.sqlalchemy_rows(sa.select(Order), bind=session)]) == 23
    with engine.connect() as conn:
        assert len(list(en.sqlalchemy_rows(sa.select(Order.__table__), bind=conn, batch_size=10))) == 23


def test_sqlalchemy_needs_bind_and_key():
    with pytest.raises(TypeError, match="bind="):
        list(en.sqlalchemy_rows(sa.select(Order)))


CSV = 'id,name,note\n1,ann,"two\nlines"\n2,bob,plain\n3,"c, d",""\n4,é,last\n'


def test_csv_rows_resume_by_byte_offset(tmp_path):
    path = tmp_path / "people.csv"
    path.write_bytes(CSV.encode())
    full = assert_resumable(lambda c: en.csv_rows(str(path), cursor=c))
    assert [row["name"] for row, _ in full] == ["ann", "bob", "c, d", "é"]
    assert full[0][0]["note"] == "two\nlines"
    assert full[-1][1] == len(CSV.encode())
    rows = [r for r, _ in en.csv_rows(str(path), header=False)]
    assert rows[0] == ["id", "name", "note"]


def test_csv_batches(tmp_path):
    path = tmp_path / "people.csv"
    path.write_bytes(CSV.encode())
    full = assert_resumable(lambda c: en.csv_batches(str(path), cursor=c, batch_size=3))
    assert [[r["id"] for r in batch] for batch, _ in full] == [["1", "2", "3"], ["4"]]


def test_empty_csv(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    assert list(en.csv_rows(str(path))) == []


def test_cursors_are_validated_against_their_enumerator(tmp_path):
    from checkpoint import InvalidCursorError
    for bad in (-5, 10, 3, True, "2"):
        with pytest.raises(InvalidCursorError):
            en.integers(0, 10, 2, cursor=bad)
    assert [c for _, c in en.integers(0, 10, 2, cursor=4)] == [6, 8]
    assert list(en.integers(0, 10, 2, cursor=8)) == []
    for bad in (-1, 3, 1.0):
        with pytest.raises(InvalidCursorError):
            en.sequence("abc", cursor=bad)
    path = tmp_path / "x.csv"
    path.write_text("a\n1\n")
    with pytest.raises(InvalidCursorError, match="byte offset"):
        en.csv_rows(str(path), cursor=99)


def test_typed_keys_round_trip_through_json():
    import datetime as dt
    import decimal
    import uuid as uuidlib
    from checkpoint import keyset, validate_cursor
    cols = sa.table("t", sa.column("a", sa.DateTime), sa.column("b", sa.Date), sa.column("c", sa.Numeric(10, 2)),
                    sa.column("d", sa.Uuid), sa.column("e", sa.Integer)).c
    values = [dt.datetime(2024, 2, 29, 23, 59, 59, 123456), dt.date(2024, 2, 29), decimal.Decimal("12.50"),
              uuidlib.uuid4(), 7]
    encoded = validate_cursor([keyset.encode_key(v) for v in values])
    assert [keyset.decode_key(v, c) for v, c in zip(encoded, [cols.a, cols.b, cols.c, cols.d, cols.e])] == values
