"""After a downtime of several slots, each missed-slot policy enqueues what it says, through a real
DatabaseScheduler on a real database (every engine): skip none, latest one, catch_up:N the latest N."""
from __future__ import annotations

import importlib
import sys
from datetime import datetime, timedelta

from celery_sqlbackend import recurring
from celery_sqlbackend.beat import DatabaseScheduler
from celery_sqlbackend.store import utcnow
from tests.harness import rows
from tests.recurring.conftest import make_app


def test_missed_slot_policies_after_downtime(tmp_path, db_url, monkeypatch):
    make_app(tmp_path, db_url, schedule={})
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("recapp", None)
    app = importlib.import_module("recapp").app
    for key, missed in (("skip", "skip"), ("latest", "latest"), ("three", "catch_up:3")):
        assert recurring.add(app, key, "rec.ping", timedelta(minutes=1), missed=missed) == "added"
    sched = DatabaseScheduler(app)
    # Down for ten minutes: the schedulers last looked 10.5 minutes before "now".
    now = utcnow().replace(second=30, microsecond=0)
    since = now - timedelta(minutes=10, seconds=30)
    rows(db_url, "UPDATE sqlq_recurring_tasks SET since_at = :s", {"s": since})
    sched._round(now)
    latest_slot = now.replace(second=0)
    got = {k: sorted(r[0] for r in rows(db_url, "SELECT slot_at FROM sqlq_recurring_executions WHERE task_key = :k",
                                        {"k": k})) for k in ("skip", "latest", "three")}
    norm = {k: [v if isinstance(v, datetime) else datetime.fromisoformat(v) for v in vs]
            for k, vs in got.items()}
    assert norm["skip"] == []
    assert norm["latest"] == [latest_slot]
    assert norm["three"] == [latest_slot - timedelta(minutes=m) for m in (2, 1, 0)]
    # A second pass (another scheduler, the same "now") enqueues nothing more.
    sched._round(now)
    assert rows(db_url, "SELECT COUNT(*) FROM sqlq_recurring_executions")[0][0] == 4
    # The next slot, on time, is enqueued for every policy.
    sched._round(latest_slot + timedelta(minutes=1, seconds=1))
    assert rows(db_url, "SELECT COUNT(*) FROM sqlq_recurring_executions")[0][0] == 7
    assert rows(db_url, "SELECT COUNT(*) FROM sqlq_jobs")[0][0] == 7
    sched.close()
