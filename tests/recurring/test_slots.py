"""Slot times from the schedule alone: interval alignment, crontab across Europe/Berlin's DST changes,
solar events, and which due slots each missed-slot policy runs."""
from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from celery.schedules import crontab, solar

from celery_sqlbackend.beat import plan
from celery_sqlbackend.slots import Cron, Every, ScheduleError, Solar, between, from_celery, from_spec, parse_cron, to_json


def test_interval_slots_are_aligned_to_the_epoch_whoever_computes_them():
    e = Every(30)
    assert e.after(datetime(2026, 5, 1, 12, 0, 7)) == datetime(2026, 5, 1, 12, 0, 30)
    assert e.at_or_before(datetime(2026, 5, 1, 12, 0, 29, 999999)) == datetime(2026, 5, 1, 12, 0)
    assert e.at_or_before(datetime(2026, 5, 1, 12, 0, 30)) == datetime(2026, 5, 1, 12, 0, 30)
    # Two schedulers whose clocks differ by 3 s compute the same slot times.
    assert list(between(e, datetime(2026, 5, 1, 12, 0, 3), datetime(2026, 5, 1, 12, 2))) == \
        list(between(e, datetime(2026, 5, 1, 12, 0, 0), datetime(2026, 5, 1, 12, 2)))


def test_daily_crontab_in_berlin_runs_once_on_each_dst_change_day():
    c = Cron(minute="30", hour="2", tz="Europe/Berlin")
    march = list(between(c, datetime(2026, 3, 27), datetime(2026, 3, 31)))
    # 02:30 does not exist on 29 March: it runs at 01:30 UTC (03:30 CEST), once, not skipped.
    assert march == [datetime(2026, 3, 27, 1, 30), datetime(2026, 3, 28, 1, 30), datetime(2026, 3, 29, 1, 30),
                     datetime(2026, 3, 30, 0, 30)]
    october = list(between(c, datetime(2026, 10, 23), datetime(2026, 10, 27)))
    # 02:30 happens twice on 25 October: it runs at the first one only.
    assert october == [datetime(2026, 10, 23, 0, 30), datetime(2026, 10, 24, 0, 30), datetime(2026, 10, 25, 0, 30),
                       datetime(2026, 10, 26, 1, 30)]


def test_hourly_crontab_has_one_slot_per_real_hour_across_dst_changes():
    h = Cron(minute="30", hour="*", tz="Europe/Berlin")
    spring = list(between(h, datetime(2026, 3, 28, 23), datetime(2026, 3, 29, 3)))
    autumn = list(between(h, datetime(2026, 10, 24, 22), datetime(2026, 10, 25, 3)))
    for got in (spring, autumn):
        assert all(b - a == timedelta(hours=1) for a, b in zip(got, got[1:])), got
    assert len(spring) == 4 and len(autumn) == 5


def test_crontab_walks_back_the_same_slots_it_walks_forward():
    c = from_celery(crontab(minute="*/20", hour="1-3", day_of_week="sun"), "Europe/Berlin")
    forward = list(between(c, datetime(2026, 10, 18), datetime(2026, 11, 2)))
    back, s = [], c.at_or_before(datetime(2026, 11, 2))
    while s is not None and s > datetime(2026, 10, 18):
        back.append(s)
        s = c.at_or_before(s - timedelta(microseconds=1))
    # 18 Oct from 00:00 UTC: 5; 25 Oct (02:xx repeated, run once): 9; 1 Nov: 9.
    assert forward == back[::-1] and len(forward) == len(set(forward)) == 5 + 9 + 9


def test_celery_schedules_round_trip_through_json():
    for sched in (Every(2.5), parse_cron("0 2 * * mon-fri", "America/New_York"), Cron(day_of_month="1,15")):
        assert from_spec(to_json(sched)) == sched
    assert from_celery(crontab(hour=2, minute=0), "Europe/Berlin") == Cron(minute="0", hour="2", tz="Europe/Berlin")
    assert from_celery(timedelta(minutes=1)) == Every(60.0)


def test_bad_schedules_say_what_to_write():
    with pytest.raises(ScheduleError, match="IANA"):
        Cron(tz="Mars/Olympus")
    with pytest.raises(ScheduleError, match="5 fields"):
        parse_cron("0 2 * *")
    with pytest.raises(ScheduleError, match="positive"):
        Every(0)
    with pytest.raises(ScheduleError, match="never occurs"):
        Cron(day_of_month="30", month_of_year="2")


def test_solar_slots_are_the_events_to_the_second():
    s = from_celery(solar("sunset", 52.52, 13.40))
    first = s.after(datetime(2026, 6, 1))
    assert first.date() == datetime(2026, 6, 1).date() and first.microsecond == 0 and 18 <= first.hour <= 20
    assert s.at_or_before(first) == first and s.at_or_before(first - timedelta(seconds=1)) < first - timedelta(hours=23)
    assert Solar("sunset", 52.52, 13.40).spec()["event"] == "sunset"


T0 = datetime(2026, 5, 1, 12, 0)
GRACE = timedelta(seconds=5)


@pytest.mark.parametrize("missed,catch_up,expected", [
    ("skip", 0, []),
    ("latest", 0, [T0 + timedelta(minutes=9)]),
    ("catch_up", 3, [T0 + timedelta(minutes=m) for m in (7, 8, 9)]),
    ("catch_up", 50, [T0 + timedelta(minutes=m) for m in range(1, 10)]),
])
def test_downtime_policies(missed, catch_up, expected):
    # Down from T0 to 9.5 minutes later: nine one-minute slots were missed, none is on time.
    now = T0 + timedelta(minutes=9, seconds=30)
    assert plan(Every(60), since=T0, now=now, missed=missed, catch_up=catch_up, grace=GRACE) == expected


@pytest.mark.parametrize("missed,catch_up", [("skip", 0), ("latest", 0), ("catch_up", 3)])
def test_on_time_slots_always_run_and_latest_adds_nothing_then(missed, catch_up):
    now = T0 + timedelta(minutes=9, seconds=2)     # the 9-minute slot is 2 s old: on time
    got = plan(Every(60), since=T0, now=now, missed=missed, catch_up=catch_up, grace=GRACE)
    assert got[-1] == T0 + timedelta(minutes=9)
    assert len(got) == {"skip": 1, "latest": 1, "catch_up": 4}[missed]
    # Nothing at or before ``since`` (the latest slot some scheduler enqueued) is tried again.
    assert plan(Every(60), since=T0 + timedelta(minutes=9), now=now, missed=missed, catch_up=catch_up,
                grace=GRACE) == []
