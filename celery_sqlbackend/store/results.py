"""Every statement the result backend runs, one named function each.

Same conventions as the other statement modules: each function takes an
open connection (inside a transaction the caller owns), the store's
``Tables`` (and ``Dialect`` where it matters) and plain values; the
``Results`` gateway (``store.results``) runs each in the store's retried
transaction.  Payloads arrive already encoded: nothing here knows about Celery or
serializers.

Results are written with an upsert that never replaces a SUCCESS (a lost or
redelivered task must not overwrite the outcome of the run that finished).
On PostgreSQL every ready result sends ``pg_notify(<prefix>results, task_id)``
from the storing transaction, so waiters wake on commit and never for a
rolled-back write.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Sequence

from sqlalchemy import Connection, Row, and_, delete, insert, or_, select, text, update

from .dialects import Dialect
from .gateway import Gateway
from .schema import Tables
from .sql import chunks as _chunks, delete_batch

#: Result states after which a task will not change on its own (Celery's READY_STATES).
READY_STATES = ("SUCCESS", "FAILURE", "REVOKED")

#: Rows per ``IN (...)`` list; a group below this size is fetched in one query.
IN_CHUNK = 5000


def notify_channel(t: Tables) -> str:
    """The LISTEN/NOTIFY channel on which ready results are announced."""
    return f"{t.prefix}results"


@dataclass(frozen=True)
class ChordCount:
    done: int
    size: int | None
    #: True for exactly one caller: the part that completed the chord.
    fire: bool


# --------------------------------------------------------------------------- helpers

def _upsert(conn: Connection, d: Dialect, table, key: str, values: dict[str, Any],
            update_values: dict[str, Any], where=None) -> bool:
    """Insert ``values`` or update the row with the same ``key``; False if ``where`` refused the update."""
    if d.insert_on_conflict is not None:
        ins = d.insert_on_conflict(table).values(**values)
        stmt = ins.on_conflict_do_update(index_elements=[key], set_=update_values, where=where)
        return conn.execute(stmt.returning(table.c[key])).first() is not None
    # MySQL/MariaDB and others: update first (locking an existing row only: a
    # locked *missing* row is a gap lock on MySQL, which deadlocks inserts).
    cond = table.c[key] == values[key]
    upd = update(table).where(cond)
    if where is not None:
        upd = upd.where(where)
    if conn.execute(upd.values(**update_values)).rowcount:
        return True
    if conn.execute(select(table.c[key]).where(cond)).first() is not None:
        return False
    conn.execute(insert(table).values(**values))
    return True


def _notify(conn: Connection, t: Tables, d: Dialect, task_ids: Iterable[str]) -> None:
    if d.notify:
        for task_id in task_ids:
            conn.execute(text("SELECT pg_notify(:channel, :task_id)"),
                         {"channel": notify_channel(t), "task_id": task_id})


# --------------------------------------------------------------------------- task results

def store_result(conn: Connection, t: Tables, d: Dialect, *, task_id: str, status: str, content_type: str,
                 content_encoding: str, payload: bytes, now: datetime, date_done: datetime | None = None,
                 name: str | None = None, worker: str | None = None, retries: int | None = None,
                 queue: str | None = None, group_id: str | None = None, notify: bool = True) -> bool:
    """Insert or replace the result of ``task_id``, unless it is already SUCCESS (or a later attempt's).

    Returns whether the row was written.  A written ready result is announced
    on ``notify_channel`` (PostgreSQL; delivered on commit).
    """
    r = t.results
    values = dict(task_id=task_id, status=status, content_type=content_type,
                  content_encoding=content_encoding, payload=payload, name=name, worker=worker,
                  retries=retries, queue=queue, group_id=group_id, date_done=date_done, updated_at=now)
    changes = {k: v for k, v in values.items() if k != "task_id"}
    where = r.c.status != "SUCCESS"
    if status == "RETRY":
        # A RETRY comes from an attempt that a later one follows: never over that one's outcome.
        where = and_(where, r.c.status.not_in(READY_STATES))
    if retries is not None:
        # An earlier attempt's state never replaces a later one's: Celery's retry publishes the next
        # attempt before it records RETRY, and a worker woken at once may have finished that attempt.
        where = and_(where, or_(r.c.retries.is_(None), r.c.retries <= retries))
    stored = _upsert(conn, d, r, "task_id", values, changes, where=where)
    if stored and notify and status in READY_STATES:
        _notify(conn, t, d, [task_id])
    return stored


def get_result(conn: Connection, t: Tables, *, task_id: str):
    """The stored row (status, content_type, content_encoding, payload, ...) or None."""
    r = t.results
    return conn.execute(
        select(r.c.task_id, r.c.status, r.c.content_type, r.c.content_encoding, r.c.payload)
        .where(r.c.task_id == task_id)
    ).first()


def get_results(conn: Connection, t: Tables, *, task_ids: Sequence[str],
                states: Sequence[str] | None = READY_STATES) -> list:
    """The rows of ``task_ids`` (only those in ``states``; None: any), one query per ``IN_CHUNK`` ids."""
    r = t.results
    rows = []
    for chunk in _chunks(list(task_ids), IN_CHUNK):
        q = (select(r.c.task_id, r.c.status, r.c.content_type, r.c.content_encoding, r.c.payload)
             .where(r.c.task_id.in_(chunk)))
        if states is not None:
            q = q.where(r.c.status.in_(list(states)))
        rows.extend(conn.execute(q).all())
    return rows


def result_exists(conn: Connection, t: Tables, *, task_id: str) -> bool:
    r = t.results
    return conn.execute(select(r.c.id).where(r.c.task_id == task_id)).first() is not None


def forget(conn: Connection, t: Tables, *, task_ids: Sequence[str]) -> int:
    r = t.results
    n = 0
    for chunk in _chunks(list(task_ids), IN_CHUNK):
        n += conn.execute(delete(r).where(r.c.task_id.in_(chunk))).rowcount
    return n


def result_for_job(conn: Connection, t: Tables, *, job_id: int):
    """The result row of the task a job carried, or None (no such job, or no result yet)."""
    r, j = t.results, t.jobs
    return conn.execute(
        select(r.c.task_id, r.c.status, r.c.content_type, r.c.content_encoding, r.c.payload)
        .select_from(j.join(r, r.c.task_id == j.c.task_id))
        .where(j.c.id == job_id)
    ).first()


# --------------------------------------------------------------------------- groups

def save_group(conn: Connection, t: Tables, d: Dialect, *, group_id: str, content_type: str,
               content_encoding: str, payload: bytes, now: datetime) -> None:
    g = t.groups
    values = dict(group_id=group_id, content_type=content_type, content_encoding=content_encoding,
                  payload=payload, date_done=now)
    _upsert(conn, d, g, "group_id", values, {k: v for k, v in values.items() if k != "group_id"})


def get_group(conn: Connection, t: Tables, *, group_id: str):
    g = t.groups
    return conn.execute(
        select(g.c.group_id, g.c.content_type, g.c.content_encoding, g.c.payload).where(g.c.group_id == group_id)
    ).first()


def delete_group(conn: Connection, t: Tables, *, group_id: str) -> bool:
    return conn.execute(delete(t.groups).where(t.groups.c.group_id == group_id)).rowcount == 1


# --------------------------------------------------------------------------- chords

def chord_start(conn: Connection, t: Tables, d: Dialect, *, group_id: str, now: datetime) -> None:
    """A new run of the chord whose header is ``group_id``: counter at 0, size unknown yet.

    A frozen chord applied again reuses its group id, so this resets the row.
    """
    c = t.chords
    values = dict(group_id=group_id, size=None, done=0, fired=False, created_at=now)
    _upsert(conn, d, c, "group_id", values, {k: v for k, v in values.items() if k != "group_id"})


def chord_set_size(conn: Connection, t: Tables, d: Dialect, *, group_id: str, size: int, now: datetime) -> None:
    """Record the header size (sent before the last header task; parts may have counted already)."""
    c = t.chords
    _upsert(conn, d, c, "group_id", dict(group_id=group_id, size=size, done=0, fired=False, created_at=now),
            dict(size=size))


def chord_part_done(conn: Connection, t: Tables, d: Dialect, *, group_id: str) -> ChordCount | None:
    """Count one finished header part; None when the chord has no row (expired or never started).

    PostgreSQL and SQLite: one ``UPDATE … RETURNING`` (the row lock, or
    SQLite's write lock, serialises the parts).  MySQL: ``SELECT … FOR
    UPDATE`` then ``UPDATE``.  ``fire`` is set for the one part that flips
    ``fired`` from false to true once ``done`` has reached ``size``.
    """
    c = t.chords
    if d.update_returning:
        row = conn.execute(
            update(c).where(c.c.group_id == group_id).values(done=c.c.done + 1)
            .returning(c.c.done, c.c.size, c.c.fired)
        ).first()
        if row is None:
            return None
        done, size, fired = row
    else:
        row = conn.execute(select(c.c.done, c.c.size, c.c.fired).where(c.c.group_id == group_id)
                           .with_for_update()).first()
        if row is None:
            return None
        conn.execute(update(c).where(c.c.group_id == group_id).values(done=c.c.done + 1))
        done, size, fired = row.done + 1, row.size, row.fired
    fire = False
    if size is not None and done >= size and not fired:
        fire = conn.execute(
            update(c).where(c.c.group_id == group_id, c.c.fired.is_(False)).values(fired=True)
        ).rowcount == 1
    return ChordCount(done, size, fire)


def get_chord(conn: Connection, t: Tables, *, group_id: str):
    c = t.chords
    return conn.execute(select(c.c.group_id, c.c.size, c.c.done, c.c.fired, c.c.created_at)
                        .where(c.c.group_id == group_id)).first()


def chord_delete(conn: Connection, t: Tables, *, group_id: str) -> None:
    conn.execute(delete(t.chords).where(t.chords.c.group_id == group_id))


# --------------------------------------------------------------------------- expiry

def expire_results(conn: Connection, t: Tables, *, before: datetime, limit: int) -> int:
    """Delete one batch of results last written before ``before``; callers loop until it returns < limit."""
    return delete_batch(conn, t.results.c.id, t.results.c.updated_at < before, limit=limit)


def expire_groups(conn: Connection, t: Tables, *, before: datetime, limit: int) -> int:
    return delete_batch(conn, t.groups.c.id, t.groups.c.date_done < before, limit=limit)


def expire_chords(conn: Connection, t: Tables, *, before: datetime, limit: int) -> int:
    return delete_batch(conn, t.chords.c.group_id, t.chords.c.created_at < before, limit=limit)


class Results(Gateway):
    """``store.results``: task results, groups and chords, each statement in its own transaction."""

    __slots__ = ()

    def store_result(self, *, task_id: str, status: str, content_type: str, content_encoding: str,
                     payload: bytes, now: datetime, date_done: datetime | None = None, name: str | None = None,
                     worker: str | None = None, retries: int | None = None, queue: str | None = None,
                     group_id: str | None = None, notify: bool = True) -> bool:
        return self.store.run(store_result, self.t, self.d, task_id=task_id, status=status,
                              content_type=content_type, content_encoding=content_encoding, payload=payload,
                              now=now, date_done=date_done, name=name, worker=worker, retries=retries,
                              queue=queue, group_id=group_id, notify=notify)

    def get(self, task_id: str) -> Row | None:
        return self.store.read(get_result, self.t, task_id=task_id)

    def get_many(self, task_ids: Sequence[str], *, states: Sequence[str] | None = READY_STATES) -> list[Row]:
        return self.store.read(get_results, self.t, task_ids=task_ids, states=states)

    def exists(self, task_id: str) -> bool:
        return self.store.read(result_exists, self.t, task_id=task_id)

    def forget(self, task_ids: Sequence[str]) -> int:
        return self.store.run(forget, self.t, task_ids=task_ids)

    def for_job(self, job_id: int) -> Row | None:
        return self.store.read(result_for_job, self.t, job_id=job_id)

    def save_group(self, *, group_id: str, content_type: str, content_encoding: str, payload: bytes,
                   now: datetime) -> None:
        self.store.run(save_group, self.t, self.d, group_id=group_id, content_type=content_type,
                       content_encoding=content_encoding, payload=payload, now=now)

    def get_group(self, group_id: str) -> Row | None:
        return self.store.read(get_group, self.t, group_id=group_id)

    def delete_group(self, group_id: str) -> bool:
        return self.store.run(delete_group, self.t, group_id=group_id)

    def chord_start(self, *, group_id: str, now: datetime) -> None:
        self.store.run(chord_start, self.t, self.d, group_id=group_id, now=now)

    def chord_set_size(self, *, group_id: str, size: int, now: datetime) -> None:
        self.store.run(chord_set_size, self.t, self.d, group_id=group_id, size=size, now=now)

    def chord_part_done(self, group_id: str) -> ChordCount | None:
        return self.store.run(chord_part_done, self.t, self.d, group_id=group_id)

    def get_chord(self, group_id: str) -> Row | None:
        return self.store.read(get_chord, self.t, group_id=group_id)

    def chord_delete(self, group_id: str) -> None:
        self.store.run(chord_delete, self.t, group_id=group_id)

    def expire_results(self, *, before: datetime, limit: int) -> int:
        return self.store.run(expire_results, self.t, before=before, limit=limit)

    def expire_groups(self, *, before: datetime, limit: int) -> int:
        return self.store.run(expire_groups, self.t, before=before, limit=limit)

    def expire_chords(self, *, before: datetime, limit: int) -> int:
        return self.store.run(expire_chords, self.t, before=before, limit=limit)
