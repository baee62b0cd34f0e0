"""Recurring tasks from Python: list, add or change, pause, resume, remove, run now.

The definitions live in the database (``recurring_tasks``), where every
running ``DatabaseScheduler`` reads them on each tick: a change made here is
acted on within one tick, on every host, without restarting anything::

    from celery.schedules import crontab
    from celery_sqlbackend import recurring

    recurring.add(app, "nightly-report", "reports.nightly", crontab(hour=2, minute=0),
                  missed="catch_up:3", timezone="Europe/Berlin")
    recurring.pause(app, "nightly-report")
    recurring.run_now(app, "nightly-report")

``beat_schedule`` is the declared baseline: each scheduler writes it at start
(``sync_declared``); a declared task changed here is set back to its
declaration by the next scheduler start, a runtime-added one is left alone.

Missed slots after downtime (``missed``): ``"skip"``, ``"latest"`` (run the
latest missed slot once; the default) or ``"catch_up:N"`` (the latest N).
A slot is *missed* when it is more than the scheduler's grace
(``sqlq_beat_grace``) old by the time a scheduler first sees it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping, Sequence

from celery import uuid

from . import slots as slotlib
from .errors import SQLQError
from .publishing import enqueue_in
from .store import Store, utcnow
from .store import recurring as rows
from .store.recurring import RecurringRow

#: The missed-slot policies (``catch_up`` takes a count: ``"catch_up:3"``).
POLICIES = ("skip", "latest", "catch_up")
#: Message headers a recurring job carries: its task key and its slot time (ISO 8601, UTC).
KEY_HEADER = "sqlq_recurring"
SLOT_HEADER = "sqlq_slot"


class RecurringTaskError(SQLQError, ValueError):
    """A recurring task that does not exist, or a definition that cannot be stored."""


@dataclass(frozen=True)
class RecurringTask:
    """A recurring task as ``list`` shows it."""
    key: str
    task: str
    schedule: str          # for people ("every 30s", "cron 0 2 * * * (Europe/Berlin)")
    spec: dict
    args: list
    kwargs: dict
    options: dict
    missed: str            # skip | latest | catch_up:N
    paused: bool
    declared: bool         # from beat_schedule
    next_run_at: datetime | None
    last_slot_at: datetime | None
    last_run_at: datetime | None
    last_task_id: str | None


def store_of(app_or_store: Any) -> Store:
    if isinstance(app_or_store, Store):
        return app_or_store
    from .failed import store_for_app
    return store_for_app(app_or_store)


# --------------------------------------------------------------------------- definitions

def parse_missed(value: str | None) -> tuple[str, int]:
    """``"skip"``, ``"latest"`` or ``"catch_up:N"`` (also ``catch-up:N``) -> (policy, N)."""
    text = (value or "latest").strip().lower().replace("-", "_")
    name, _, count = text.partition(":")
    if name in ("skip", "latest") and not count:
        return name, 0
    if name == "catch_up" and count.isdigit() and int(count) > 0:
        return name, int(count)
    raise RecurringTaskError(f"missed={value!r}: write skip, latest (run the latest missed slot once) or "
                             "catch_up:N (run the latest N missed slots)")


def format_missed(policy: str, count: int) -> str:
    return f"catch_up:{count}" if policy == "catch_up" else policy


def _json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise RecurringTaskError(f"{what} must be JSON-serialisable to be stored ({exc})") from None


def definition(task: str, schedule: Any, *, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
               options: Mapping[str, Any] | None = None, missed: str | None = None,
               timezone: str | None = None, app: Any = None) -> dict[str, Any]:
    """The stored columns for one task; ``schedule`` as in ``beat_schedule`` or a ``slots`` object."""
    if not task or not isinstance(task, str):
        raise RecurringTaskError("a recurring task needs the name of the task to send (task='proj.tasks.x')")
    if isinstance(schedule, (slotlib.Every, slotlib.Cron, slotlib.Solar)):
        slots = schedule
    else:
        from celery.schedules import crontab
        if isinstance(schedule, crontab) and app is not None and timezone is None:
            timezone = slotlib._zone_name(app.timezone)
        slots = slotlib.from_celery(schedule, timezone)
    policy, count = parse_missed(missed)
    return {"task": task, "schedule": slotlib.to_json(slots), "args": _json(list(args or ()), "args"),
            "kwargs": _json(dict(kwargs or {}), "kwargs"), "options": _json(dict(options or {}), "options"),
            "missed": policy, "catch_up": count}


def declared_definitions(app: Any) -> dict[str, dict[str, Any]]:
    """``app.conf.beat_schedule`` as stored definitions (entry keys ``sqlq_missed``/``sqlq_timezone`` read here)."""
    out = {}
    for key, entry in (app.conf.beat_schedule or {}).items():
        try:
            out[key] = definition(entry["task"], entry["schedule"], args=entry.get("args") or (),
                                  kwargs=entry.get("kwargs"), options=entry.get("options"),
                                  missed=entry.get("sqlq_missed"), timezone=entry.get("sqlq_timezone"), app=app)
        except (KeyError, SQLQError) as exc:
            raise RecurringTaskError(f"beat_schedule[{key!r}]: {exc}") from None
    return out


# --------------------------------------------------------------------------- the API

def sync_declared(app: Any) -> dict[str, str]:
    """Write ``beat_schedule`` as the declared tasks (added/changed/unchanged/removed, per key)."""
    return store_of(app).recurring.sync_declared(declared_definitions(app), now=utcnow())


def add(app: Any, key: str, task: str, schedule: Any, *, args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None, options: Mapping[str, Any] | None = None,
        missed: str | None = None, timezone: str | None = None) -> str:
    """Add ``key`` or change its definition (``"added"``/``"changed"``/``"unchanged"``)."""
    if not key or len(key) > 255:
        raise RecurringTaskError("a recurring task's key is 1 to 255 characters")
    d = definition(task, schedule, args=args, kwargs=kwargs, options=options, missed=missed, timezone=timezone,
                   app=None if isinstance(app, Store) else app)
    return store_of(app).recurring.put(key=key, definition=d, declared=False, now=utcnow())


def _require(store: Store, key: str) -> RecurringRow:
    row = store.recurring.get(key)
    if row is None:
        raise RecurringTaskError(f"no recurring task {key!r}; `celery sqlq recurring list` shows them")
    return row


def pause(app: Any, key: str) -> bool:
    """Stop enqueuing ``key`` (True if it was running); slots while paused are never run."""
    store = store_of(app)
    _require(store, key)
    return store.recurring.set_paused(key=key, paused=True, now=utcnow())


def resume(app: Any, key: str) -> bool:
    """Enqueue ``key`` again from its next slot (True if it was paused)."""
    store = store_of(app)
    _require(store, key)
    return store.recurring.set_paused(key=key, paused=False, now=utcnow())


def remove(app: Any, key: str) -> None:
    store = store_of(app)
    if not store.recurring.delete(key):
        raise RecurringTaskError(f"no recurring task {key!r}; `celery sqlq recurring list` shows them")


def run_now(app: Any, key: str) -> str:
    """Enqueue ``key``'s task now, outside its schedule (its slot header is now); the task id."""
    store = store_of(app)
    row = _require(store, key)
    now = utcnow()
    task_id = uuid()
    with app.producer_or_acquire() as producer:
        declare_queue(app, row, producer)
        store.run(enqueue_slot, app, store, row, now, task_id, manual=True, now=now, producer=producer)
    return task_id


def tasks(app: Any, now: datetime | None = None) -> list[RecurringTask]:
    """Every recurring task with its next slot (None while paused)."""
    now = now or utcnow()
    return [describe(r, now) for r in store_of(app).recurring.all()]


def describe(row: RecurringRow, now: datetime) -> RecurringTask:
    try:
        slots = slotlib.from_spec(row.schedule)
        text, nxt = slots.describe(), (None if row.paused else slots.after(max(now, row.last_slot_at or now)))
    except (SQLQError, ValueError, KeyError) as exc:
        text, nxt = f"invalid: {exc}", None
    return RecurringTask(key=row.key, task=row.task, schedule=text, spec=json.loads(row.schedule),
                         args=json.loads(row.args), kwargs=json.loads(row.kwargs), options=json.loads(row.options),
                         missed=format_missed(row.missed, row.catch_up), paused=row.paused, declared=row.declared,
                         next_run_at=nxt, last_slot_at=row.last_slot_at, last_run_at=row.last_run_at,
                         last_task_id=row.last_task_id)


# --------------------------------------------------------------------------- one slot

def declare_queue(app: Any, row: RecurringRow, producer: Any) -> None:
    """Declare the queue ``row``'s jobs are routed to, before the slot's transaction.

    Why: declaring a queue writes (its bindings) in a transaction of its own;
    inside the slot's transaction on SQLite that would wait for the write
    lock the slot's transaction holds.  kombu remembers a declared queue per
    connection, so the publish inside the transaction declares nothing.
    """
    options = json.loads(row.options)
    route = app.amqp.router.route(dict(options), row.task, json.loads(row.args), json.loads(row.kwargs))
    queue = route.get("queue")
    if queue is not None and not isinstance(queue, str):
        producer.maybe_declare(queue)


def enqueue_slot(conn: Any, app: Any, store: Store, row: RecurringRow, slot_at: datetime, task_id: str, *,
                 manual: bool, now: datetime, producer: Any = None) -> bool:
    """In the caller's transaction: take ``row``'s slot and publish its job; False if already taken.

    The slot row and the job commit together or not at all (``enqueue_in``),
    so a scheduler that dies mid-way leaves the slot free for the next one.
    """
    if not rows.take_slot(conn, store.t, store.dialect, key=row.key, slot_at=slot_at, task_id=task_id,
                          manual=manual, now=now):
        return False
    options = json.loads(row.options)
    headers = dict(options.pop("headers", None) or {})
    headers.update({KEY_HEADER: row.key, SLOT_HEADER: slot_at.isoformat() + "Z", "celery_beat_task": True})
    args, kwargs = json.loads(row.args), json.loads(row.kwargs)
    with enqueue_in(conn):
        task = app.tasks.get(row.task)
        if task is not None:
            task.apply_async(args, kwargs, task_id=task_id, headers=headers, producer=producer, **options)
        else:
            app.send_task(row.task, args, kwargs, task_id=task_id, headers=headers, producer=producer, **options)
    rows.record_run(conn, store.t, key=row.key, slot_at=None if manual else slot_at, task_id=task_id, now=now)
    return True
