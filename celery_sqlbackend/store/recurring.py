"""Recurring tasks' rows: the definitions every scheduler reads, and the one-row-per-slot claim.

A slot is taken by inserting ``(task_key, slot_at)`` into ``recurring_executions``
with "do nothing on conflict" (``ON CONFLICT DO NOTHING`` on PostgreSQL and
SQLite, ``INSERT IGNORE`` on MySQL/MariaDB).  A concurrent scheduler's insert
of the same slot waits on the winner's uncommitted index entry, then does
nothing; the winner publishes the job in the same transaction
(``beat.DatabaseScheduler``), so the row exists exactly when the job does.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Sequence

from sqlalchemy import Connection, delete, insert, select, update

from .dialects import Dialect
from .gateway import Gateway
from .schema import Tables

#: The columns a definition sets (``add``/``sync_declared``); the rest is run state.
DEFINITION = ("task", "schedule", "args", "kwargs", "options", "missed", "catch_up")


@dataclass(frozen=True, slots=True)
class RecurringRow:
    """One recurring task as stored (JSON columns still as text)."""
    key: str
    task: str
    schedule: str
    args: str
    kwargs: str
    options: str
    missed: str
    catch_up: int
    paused: bool
    declared: bool
    since_at: datetime
    last_slot_at: datetime | None
    last_run_at: datetime | None
    last_task_id: str | None
    created_at: datetime
    updated_at: datetime


def _row(r: Any) -> RecurringRow:
    return RecurringRow(**{name: getattr(r, name) for name in RecurringRow.__slots__})


def insert_ignore(conn: Connection, table: Any, d: Dialect, values: dict[str, Any],
                  conflict: Sequence[str]) -> bool:
    """Insert ``values`` unless a row with the same ``conflict`` key exists; True if inserted.

    Never raises on the conflict, so the caller's transaction goes on either way.
    """
    if d.insert_on_conflict is not None:
        # RETURNING, not rowcount: psycopg reports no reliable rowcount for a prepared
        # ``ON CONFLICT DO NOTHING`` (measured: -1 for an inserted row).
        stmt = (d.insert_on_conflict(table).values(**values).on_conflict_do_nothing(index_elements=list(conflict))
                .returning(table.c[conflict[0]]))
        return conn.execute(stmt).first() is not None
    return conn.execute(insert(table).prefix_with("IGNORE").values(**values)).rowcount == 1


def all_tasks(conn: Connection, t: Tables) -> list[RecurringRow]:
    r = t.recurring_tasks
    return [_row(x) for x in conn.execute(select(r).order_by(r.c.key))]


def get(conn: Connection, t: Tables, key: str) -> RecurringRow | None:
    r = t.recurring_tasks
    found = conn.execute(select(r).where(r.c.key == key)).first()
    return _row(found) if found is not None else None


def put(conn: Connection, t: Tables, d: Dialect, *, key: str, definition: dict[str, Any], declared: bool,
        now: datetime) -> str:
    """Create or change ``key``'s definition; "added", "changed" or "unchanged".

    A changed schedule starts counting slots from ``now`` (the old schedule's
    missed slots are not the new one's).  Pause state and run history are kept.
    """
    r = t.recurring_tasks
    if insert_ignore(conn, r, d, {"key": key, **definition, "paused": False, "declared": declared,
                                  "since_at": now, "created_at": now, "updated_at": now}, ["key"]):
        return "added"
    old = get(conn, t, key)
    if old is None:   # removed between the two statements: next sync adds it
        return "unchanged"
    if old.declared == declared and all(getattr(old, n) == definition[n] for n in DEFINITION):
        return "unchanged"
    values: dict[str, Any] = {**definition, "declared": declared, "updated_at": now}
    if old.schedule != definition["schedule"]:
        values["since_at"] = now
    conn.execute(update(r).where(r.c.key == key).values(**values))
    return "changed"


def remove_undeclared(conn: Connection, t: Tables, *, keep: Sequence[str]) -> list[str]:
    """Delete declared tasks no longer in ``beat_schedule`` (runtime additions stay); their keys."""
    r = t.recurring_tasks
    gone = [k for k in conn.execute(select(r.c.key).where(r.c.declared.is_(True))).scalars() if k not in set(keep)]
    if gone:
        conn.execute(delete(r).where(r.c.key.in_(gone)))
    return gone


def set_paused(conn: Connection, t: Tables, *, key: str, paused: bool, now: datetime) -> bool:
    """Pause or resume; a resumed task counts slots from ``now`` (the paused ones are not "missed")."""
    r = t.recurring_tasks
    values: dict[str, Any] = {"paused": paused, "updated_at": now}
    if not paused:
        values["since_at"] = now
    return conn.execute(update(r).where(r.c.key == key, r.c.paused.is_(not paused)).values(**values)).rowcount == 1


def delete_task(conn: Connection, t: Tables, *, key: str) -> bool:
    r = t.recurring_tasks
    return conn.execute(delete(r).where(r.c.key == key)).rowcount == 1


def take_slot(conn: Connection, t: Tables, d: Dialect, *, key: str, slot_at: datetime, task_id: str,
              manual: bool, now: datetime) -> bool:
    """Insert the slot's row; False when another scheduler has it (then publish nothing)."""
    return insert_ignore(conn, t.recurring_executions, d,
                         {"task_key": key, "slot_at": slot_at, "task_id": task_id, "manual": manual,
                          "created_at": now}, ["task_key", "slot_at"])


def record_run(conn: Connection, t: Tables, *, key: str, slot_at: datetime | None, task_id: str,
               now: datetime) -> None:
    """Remember the latest run; ``last_slot_at`` only moves forward (a scheduled slot, not run-now)."""
    r = t.recurring_tasks
    conn.execute(update(r).where(r.c.key == key).values(last_run_at=now, last_task_id=task_id))
    if slot_at is not None:
        conn.execute(update(r).where(r.c.key == key, (r.c.last_slot_at.is_(None)) | (r.c.last_slot_at < slot_at))
                     .values(last_slot_at=slot_at))


def executions(conn: Connection, t: Tables, *, key: str | None = None, limit: int = 100) -> list[tuple]:
    """The latest slot rows (newest first): (task_key, slot_at, task_id, manual, created_at)."""
    e = t.recurring_executions
    q = select(e.c.task_key, e.c.slot_at, e.c.task_id, e.c.manual, e.c.created_at)
    if key is not None:
        q = q.where(e.c.task_key == key)
    return [tuple(x) for x in conn.execute(q.order_by(e.c.slot_at.desc(), e.c.id.desc()).limit(limit))]


def prune_executions(conn: Connection, t: Tables, *, before: datetime, limit: int) -> int:
    """Delete up to ``limit`` slot rows created before ``before``, by primary key.

    Safe once older than any slot a scheduler may still try: schedulers only
    try slots after a task's ``last_slot_at``.
    """
    e = t.recurring_executions
    ids = list(conn.execute(select(e.c.id).where(e.c.created_at < before).order_by(e.c.id).limit(limit)).scalars())
    if ids:
        conn.execute(delete(e).where(e.c.id.in_(ids)))
    return len(ids)


class Recurring(Gateway):
    """``store.recurring``: recurring task definitions and slot rows (one transaction per call)."""

    __slots__ = ()

    def all(self) -> list[RecurringRow]:
        return self.store.read(all_tasks, self.t)

    def get(self, key: str) -> RecurringRow | None:
        return self.store.read(get, self.t, key)

    def put(self, *, key: str, definition: dict[str, Any], declared: bool, now: datetime) -> str:
        return self.store.run(put, self.t, self.d, key=key, definition=definition, declared=declared, now=now)

    def sync_declared(self, definitions: dict[str, dict[str, Any]], *, now: datetime) -> dict[str, str]:
        """Make the declared rows match ``definitions`` (``beat_schedule``), in one transaction."""
        def sync(conn: Connection) -> dict[str, str]:
            outcome = {key: put(conn, self.t, self.d, key=key, definition=d, declared=True, now=now)
                       for key, d in sorted(definitions.items())}
            for key in remove_undeclared(conn, self.t, keep=list(definitions)):
                outcome[key] = "removed"
            return outcome
        return self.store.run(sync)

    def set_paused(self, *, key: str, paused: bool, now: datetime) -> bool:
        return self.store.run(set_paused, self.t, key=key, paused=paused, now=now)

    def delete(self, key: str) -> bool:
        return self.store.run(delete_task, self.t, key=key)

    def executions(self, *, key: str | None = None, limit: int = 100) -> list[tuple]:
        return self.store.read(executions, self.t, key=key, limit=limit)

    def prune_executions(self, *, before: datetime, limit: int = 1000) -> int:
        return self.store.run(prune_executions, self.t, before=before, limit=limit)

    def table_exists(self) -> bool:
        from sqlalchemy import inspect
        return inspect(self.store.engine).has_table(self.t.recurring_tasks.name)
