"""``DatabaseScheduler``: Celery beat that any number of processes run at once.

    celery -A proj beat -S celery_sqlbackend.beat:DatabaseScheduler      # on as many hosts as you like
    celery -A proj worker -B -S celery_sqlbackend.beat:DatabaseScheduler # or inside every worker

Why one beat is no longer required: Celery's own scheduler keeps its state in
a local file and enqueues whatever it finds due, so two of them enqueue
everything twice.  Here every scheduler computes the same slot times from the
schedule alone (``slots``), and enqueuing a slot is one transaction that
inserts a ``(task key, slot time)`` row the database keeps unique together
with the job (``recurring.enqueue_slot``).  Of any number of schedulers
racing for a slot one inserts the row and the job; the others insert nothing.
A scheduler that dies leaves its slots to the others' next tick.

Each tick (``sqlq_beat_tick`` seconds, default 5; sooner when a slot is due)
reads every definition, so runtime changes (``recurring``, ``celery sqlq
recurring``) are acted on within one tick.  Settings (``app.conf``):

    sqlq_beat_tick   seconds between reads of the definitions (default 5.0)
    sqlq_beat_grace  a slot older than this when first seen counts as missed
                     (default max(5, 2 × tick) seconds); see ``recurring``'s missed policies
"""
from __future__ import annotations

import logging
import time as _time
from datetime import datetime, timedelta
from typing import Any

from celery import uuid
from celery.beat import Scheduler

from . import recurring
from .slots import ScheduleError, Slots, from_spec
from .store import Store, utcnow
from .store.recurring import RecurringRow

log = logging.getLogger("celery_sqlbackend.beat")

#: Slot rows are kept this long (listings), then pruned by the schedulers.
KEEP_EXECUTIONS = timedelta(days=1)
#: Most slots one task may enqueue in one tick (a guard against a microsecond interval).
MAX_SLOTS_PER_TICK = 1000
#: Woken this much after a slot's time, so that the clock has surely passed it.
WAKE_LATE = 0.005


def plan(slots: Slots, *, since: datetime, now: datetime, missed: str, catch_up: int,
         grace: timedelta) -> list[datetime]:
    """The slots to try now, oldest first: those in (since, now] not older than ``grace``,
    plus the missed ones (older) the policy keeps: none (skip), the latest one if no slot is
    on time (latest), or the latest ``catch_up`` (catch_up)."""
    wanted = {"skip": 0, "latest": 1}.get(missed, catch_up)
    on_time: list[datetime] = []
    late: list[datetime] = []
    s = slots.at_or_before(now)
    while s is not None and s > since and len(on_time) < MAX_SLOTS_PER_TICK:
        if now - s <= grace:
            on_time.append(s)
        elif len(late) < wanted:
            late.append(s)
        else:
            break
        s = slots.at_or_before(s - timedelta(microseconds=1))
    if missed == "latest" and on_time:
        late = []
    return sorted(on_time + late)


class DatabaseScheduler(Scheduler):
    """Celery beat whose schedule lives in the broker's database (module doc)."""

    def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
        conf = app.conf
        self.tick_seconds = float(conf.get("sqlq_beat_tick") or 5.0)
        grace = conf.get("sqlq_beat_grace")
        self.grace = timedelta(seconds=float(grace) if grace is not None else max(5.0, 2 * self.tick_seconds))
        self._store: Store | None = None
        self._synced = False
        self._pruned_at = 0.0
        self._bad: set[tuple[str, str]] = set()
        super().__init__(app, *args, **kwargs)
        self.max_interval = self.tick_seconds

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = recurring.store_of(self.app)
        return self._store

    # Celery's Scheduler keeps entries in memory (``self.schedule``); here they are rows.
    def setup_schedule(self) -> None:
        self.data = {}
        self._sync()

    def _sync(self) -> None:
        try:
            outcome = recurring.sync_declared(self.app)
        except recurring.RecurringTaskError:
            raise   # a bad beat_schedule entry: say so at start, not on every tick
        except Exception as exc:
            log.error("beat: could not write beat_schedule to the database (%s); retrying next tick",
                      exc.__class__.__name__, exc_info=True)
            return
        self._synced = True
        changed = {k: v for k, v in outcome.items() if v != "unchanged"}
        log.info("beat: %d declared recurring task(s) in the database%s", len(outcome),
                 f" ({', '.join(f'{k}: {v}' for k, v in sorted(changed.items()))})" if changed else "")

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """One round: enqueue every due slot not yet taken; seconds until the next round."""
        try:
            if not self._synced:
                self._sync()
            wake = self._round(utcnow())
        except Exception as exc:
            log.error("beat: tick failed (%s); next try in %.1fs", exc.__class__.__name__, self.tick_seconds,
                      exc_info=True)
            return self.tick_seconds
        return max(0.0, (wake - utcnow()).total_seconds() + WAKE_LATE)

    def _round(self, now: datetime) -> datetime:
        wake = now + timedelta(seconds=self.tick_seconds)
        for row in self.store.recurring.all():
            if row.paused:
                continue
            slots = self._slots(row)
            if slots is None:
                continue
            since = max(row.since_at, row.last_slot_at or row.since_at)
            for slot in plan(slots, since=since, now=now, missed=row.missed, catch_up=row.catch_up,
                             grace=self.grace):
                self._take(row, slot, now)
            nxt = slots.after(now)
            if nxt is not None and nxt < wake:
                wake = nxt
        self._prune()
        return wake

    def _slots(self, row: RecurringRow) -> Slots | None:
        try:
            return from_spec(row.schedule)
        except (ScheduleError, ValueError, KeyError) as exc:
            if (row.key, row.schedule) not in self._bad:
                self._bad.add((row.key, row.schedule))
                log.error("beat: recurring task %r has a schedule this scheduler cannot compute: %s", row.key, exc)
            return None

    def _take(self, row: RecurringRow, slot: datetime, now: datetime) -> None:
        try:
            recurring.declare_queue(self.app, row, self.producer)
            taken = self.store.run(recurring.enqueue_slot, self.app, self.store, row, slot, uuid(), manual=False,
                                   now=now, producer=self.producer)
        except Exception as exc:
            log.error("beat: could not enqueue %r for slot %s (%s); trying again next tick", row.key,
                      slot.isoformat(), exc, exc_info=True)
            return
        if taken:
            log.info("beat: sent %s (%s) for slot %sZ", row.task, row.key, slot.isoformat())

    def _prune(self) -> None:
        if _time.monotonic() - self._pruned_at < 60:
            return
        self._pruned_at = _time.monotonic()
        try:
            self.store.recurring.prune_executions(before=utcnow() - KEEP_EXECUTIONS)
        except Exception as exc:
            log.warning("beat: could not prune old slot rows (%s)", exc.__class__.__name__)

    def sync(self) -> None:
        """Nothing to write: every slot taken is committed with its job."""

    @property
    def info(self) -> str:
        return f"    . db -> {self.store!r} (tick {self.tick_seconds:g}s, grace {self.grace.total_seconds():g}s)"
