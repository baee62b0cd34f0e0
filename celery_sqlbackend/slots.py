"""Slot times of a recurring schedule, computed from the schedule alone (never from "now").

Every scheduler process computes the same slots for a schedule, whatever its
clock says, so the slot time is a key the database can hold unique:

* interval (``30.0``, ``timedelta``, ``celery.schedules.schedule``): the
  multiples of the interval since the Unix epoch (UTC), so a 30 s schedule has
  slots at :00 and :30 of every minute, whichever scheduler started when;
* ``crontab`` (Celery's fields and meaning: day of month AND day of week must
  match), in a time zone (the app's ``timezone``, or the entry's
  ``sqlq_timezone``).  Across DST changes a slot is neither skipped nor
  doubled: a wall time the spring change skips runs at the instant that
  wall time maps to just after the change (02:30 on Europe/Berlin's March
  day runs at 03:30 CEST); a wall time the autumn change repeats runs once,
  at its first occurrence, unless the crontab names every hour (then each
  real hour has its run);
* ``solar`` (needs ``ephem``): the event's instants, to the second.

Slots are naive UTC datetimes, the convention of every timestamp column.
Schedules are stored as JSON (``to_spec``/``from_spec``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from typing import Any, Iterator, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import SQLQError

EPOCH = datetime(1970, 1, 1)
#: A crontab that matches nothing (February 30th) is searched this far, then has no slot.
SEARCH_DAYS = 366 * 5


class ScheduleError(SQLQError, ValueError):
    """A schedule this scheduler cannot store or compute (the message says what to write instead)."""


class Slots(Protocol):
    def after(self, t: datetime) -> datetime | None:
        """The first slot strictly after ``t`` (naive UTC), or None if there is none."""

    def at_or_before(self, t: datetime) -> datetime | None:
        """The latest slot at or before ``t``, or None."""

    def spec(self) -> dict[str, Any]:
        """The JSON-able description (``from_spec`` inverts it)."""

    def describe(self) -> str:
        """One line for people."""


# --------------------------------------------------------------------------- interval

@dataclass(frozen=True)
class Every:
    """Every ``seconds``, aligned to the Unix epoch (whole microseconds)."""
    seconds: float

    def __post_init__(self) -> None:
        if not self.seconds > 0:
            raise ScheduleError(f"an interval must be positive, got {self.seconds!r} seconds")

    @property
    def _us(self) -> int:
        return max(1, round(self.seconds * 1_000_000))

    def _index(self, t: datetime) -> int:
        d = t - EPOCH
        return ((d.days * 86400 + d.seconds) * 1_000_000 + d.microseconds) // self._us

    def _at(self, k: int) -> datetime:
        return EPOCH + timedelta(microseconds=k * self._us)

    def after(self, t: datetime) -> datetime | None:
        return self._at(self._index(t) + 1)

    def at_or_before(self, t: datetime) -> datetime | None:
        return self._at(self._index(t))

    def spec(self) -> dict[str, Any]:
        return {"type": "interval", "seconds": self.seconds}

    def describe(self) -> str:
        return f"every {self.seconds:g}s"


# --------------------------------------------------------------------------- crontab

CRON_FIELDS = ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")


@dataclass(frozen=True)
class Cron:
    """A crontab in ``tz``; fields are Celery's crontab strings (``"*/15"``, ``"mon-fri"``, …)."""
    minute: str = "*"
    hour: str = "*"
    day_of_month: str = "*"
    month_of_year: str = "*"
    day_of_week: str = "*"
    tz: str = "UTC"

    def __post_init__(self) -> None:
        try:
            ZoneInfo(self.tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise ScheduleError(f"unknown time zone {self.tz!r}: use an IANA name such as Europe/Berlin") from None
        from celery.schedules import crontab
        try:
            c = crontab(minute=self.minute, hour=self.hour, day_of_week=self.day_of_week,
                        day_of_month=self.day_of_month, month_of_year=self.month_of_year)
        except ValueError as exc:
            raise ScheduleError(f"invalid crontab {self.describe()}: {exc}") from None
        sets = {"minutes": sorted(c.minute), "hours": sorted(c.hour), "dows": frozenset(c.day_of_week),
                "doms": frozenset(c.day_of_month), "months": frozenset(c.month_of_year)}
        object.__setattr__(self, "_sets", sets)

    def _day_matches(self, d: date) -> bool:
        s = self._sets
        return d.month in s["months"] and d.day in s["doms"] and (d.isoweekday() % 7) in s["dows"]

    def _day_slots(self, d: date) -> list[datetime]:
        """The UTC instants of ``d``'s matching wall times in ``tz`` (DST rules in the module doc)."""
        if not self._day_matches(d):
            return []
        zone, s = ZoneInfo(self.tz), self._sets
        every_hour = len(s["hours"]) == 24
        out: set[datetime] = set()
        for h in s["hours"]:
            for m in s["minutes"]:
                wall = datetime.combine(d, time(h, m))
                first = wall.replace(tzinfo=zone, fold=0).astimezone(timezone.utc).replace(tzinfo=None)
                out.add(first)
                second = wall.replace(tzinfo=zone, fold=1).astimezone(timezone.utc).replace(tzinfo=None)
                repeated = second != first and _wall(second, zone) == wall
                if repeated and every_hour:
                    out.add(second)
        return sorted(out)

    def _local_date(self, t: datetime) -> date:
        return _wall(t, ZoneInfo(self.tz)).date()

    def after(self, t: datetime) -> datetime | None:
        start = self._local_date(t) - timedelta(days=1)   # a gap slot may map to the day before
        for i in range(SEARCH_DAYS):
            for s in self._day_slots(start + timedelta(days=i)):
                if s > t:
                    return s
        return None

    def at_or_before(self, t: datetime) -> datetime | None:
        start = self._local_date(t) + timedelta(days=1)
        for i in range(SEARCH_DAYS):
            for s in reversed(self._day_slots(start - timedelta(days=i))):
                if s <= t:
                    return s
        return None

    def spec(self) -> dict[str, Any]:
        return {"type": "crontab", **{f: getattr(self, f) for f in CRON_FIELDS}, "tz": self.tz}

    def describe(self) -> str:
        return f"cron {' '.join(getattr(self, f) for f in CRON_FIELDS)} ({self.tz})"


def _wall(t_utc: datetime, zone: ZoneInfo) -> datetime:
    return t_utc.replace(tzinfo=timezone.utc).astimezone(zone).replace(tzinfo=None)


# --------------------------------------------------------------------------- solar

@dataclass(frozen=True)
class Solar:
    """Celery's ``solar(event, lat, lon)``: the event's instants, rounded to the second."""
    event: str
    lat: float
    lon: float

    def _celery(self):
        from celery.schedules import solar
        try:
            return solar(self.event, self.lat, self.lon)
        except Exception as exc:   # ImproperlyConfigured (no ephem), ValueError (bad event or place)
            raise ScheduleError(f"solar schedule {self.describe()}: {exc}") from None

    def _find(self, t: datetime, method: str) -> datetime | None:
        s = self._celery()
        sun = s.ephem.Sun()
        kwargs = {"use_center": True} if s.use_center else {}
        start = s.ephem.Date(t)
        for _ in range(366):
            try:
                found = getattr(s.cal, method)(sun, start=start, **kwargs).datetime()
                return (found + timedelta(microseconds=500_000)).replace(microsecond=0)
            except s.ephem.CircumpolarError:   # no such event that day (polar day or night): try the next
                start = getattr(s.cal, method.split("_")[0] + "_antitransit")(sun, start=start)
        return None

    def after(self, t: datetime) -> datetime | None:
        method = self._celery().method
        found = self._find(t, method)
        if found is not None and found <= t:   # rounding landed on t: the next one
            found = self._find(t + timedelta(seconds=1), method)
        return found

    def at_or_before(self, t: datetime) -> datetime | None:
        method = self._celery().method.replace("next_", "previous_")
        found = self._find(t + timedelta(seconds=1), method)
        if found is not None and found > t:
            found = self._find(t - timedelta(seconds=1), method)
        return found

    def spec(self) -> dict[str, Any]:
        return {"type": "solar", "event": self.event, "lat": self.lat, "lon": self.lon}

    def describe(self) -> str:
        return f"solar {self.event} at {self.lat:g},{self.lon:g}"


# --------------------------------------------------------------------------- conversion

def from_celery(schedule: Any, tz: str | None = None) -> Slots:
    """Our slots for a ``beat_schedule`` entry's schedule: a number, timedelta, or Celery schedule object."""
    from celery.schedules import crontab, schedule as interval, solar
    if isinstance(schedule, bool):
        raise ScheduleError("a schedule is a number of seconds, a timedelta, crontab(), solar() or schedule()")
    if isinstance(schedule, (int, float)):
        return Every(float(schedule))
    if isinstance(schedule, timedelta):
        return Every(schedule.total_seconds())
    if isinstance(schedule, crontab):
        zone = tz or _zone_name(schedule.tz)
        return Cron(minute=_fields(schedule._orig_minute), hour=_fields(schedule._orig_hour),
                    day_of_month=_fields(schedule._orig_day_of_month),
                    month_of_year=_fields(schedule._orig_month_of_year),
                    day_of_week=_fields(schedule._orig_day_of_week), tz=zone)
    if isinstance(schedule, solar):
        return Solar(schedule.event, float(schedule.lat), float(schedule.lon))
    if isinstance(schedule, interval):
        return Every(schedule.run_every.total_seconds())
    raise ScheduleError(f"cannot run a {type(schedule).__name__} schedule from the database: use a number of "
                        "seconds, a timedelta, crontab(), solar() or schedule()")


def _zone_name(tz: Any) -> str:
    name = getattr(tz, "key", None) or getattr(tz, "zone", None) or str(tz)
    return "UTC" if name in ("utc", "UTC", "UTC+00:00") else name


def _fields(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    return ",".join(str(v) for v in sorted(value))


def from_spec(spec: dict[str, Any] | str) -> Slots:
    """The schedule a stored JSON spec describes."""
    if isinstance(spec, str):
        spec = json.loads(spec)
    kind = spec.get("type")
    if kind == "interval":
        return Every(float(spec["seconds"]))
    if kind == "crontab":
        return Cron(**{f: _fields(spec.get(f, "*")) for f in CRON_FIELDS}, tz=spec.get("tz") or "UTC")
    if kind == "solar":
        return Solar(spec["event"], float(spec["lat"]), float(spec["lon"]))
    raise ScheduleError(f"unknown schedule type {kind!r}: expected interval, crontab or solar")


def parse_cron(expression: str, tz: str = "UTC") -> Cron:
    """``"m h dom mon dow"`` (the crontab line's order) in ``tz``."""
    parts = expression.split()
    if len(parts) != 5:
        raise ScheduleError(f"a cron expression has 5 fields (minute hour day-of-month month day-of-week), "
                            f"got {expression!r}")
    return Cron(minute=parts[0], hour=parts[1], day_of_month=parts[2], month_of_year=parts[3],
                day_of_week=parts[4], tz=tz)


def to_json(slots: Slots) -> str:
    return json.dumps(slots.spec(), sort_keys=True)


def between(slots: Slots, after: datetime, until: datetime) -> Iterator[datetime]:
    """Slots in (after, until], oldest first (for tests and listings; the scheduler walks back)."""
    s = slots.after(after)
    while s is not None and s <= until:
        yield s
        s = slots.after(s)
