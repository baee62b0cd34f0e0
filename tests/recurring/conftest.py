"""Recurring tasks: an app whose beat_schedule ticks every second, and real ``celery beat`` processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness import REPO, rows, write_app
from tests.support.zygote import forking_enabled, zygote

TICK = 0.25     # sqlq_beat_tick in the test apps
GRACE = 1.5     # sqlq_beat_grace

TASKS = '''
@app.task(name="rec.ping")
def ping(*args, **kwargs):
    return None
'''


def make_app(directory: Path, db_url: str, schedule: dict | None = None) -> Path:
    """``directory/recapp.py``: tables created on every engine, a 1-second ``beat_schedule`` by default."""
    conf = {"broker_transport_options": {"create_tables": True}, "sqlq_beat_tick": TICK, "sqlq_beat_grace": GRACE,
            "timezone": "UTC"}
    source = TASKS + "\nfrom datetime import timedelta\napp.conf.beat_schedule = " + repr(
        schedule if schedule is not None else {"every-second": {"task": "rec.ping", "schedule": 1.0}})
    return write_app(directory, f"sqlq+{db_url}", extra_conf=conf, tasks_source=source, module="recapp")


class Beat:
    """A real ``celery beat -S celery_sqlbackend.beat:DatabaseScheduler`` in its own session, forked from the
    preloaded zygote (tests/support/zygote.py) unless ``SQLQ_TEST_EXEC=1``."""

    def __init__(self, directory: Path, name: str, extra_args: tuple[str, ...] = ()) -> None:
        self.directory, self.name = Path(directory), name
        self.log_path = self.directory / f"beat-{name}.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(directory), str(REPO)]), "PYTHONUNBUFFERED": "1"}
        args = ["-A", "recapp", "beat", "-S", "celery_sqlbackend.beat:DatabaseScheduler",
                "--loglevel=INFO", "-s", str(self.directory / f"unused-{name}"), "--pidfile=", *extra_args]
        self.log_path.touch()
        if forking_enabled():
            self.proc = zygote().spawn(args, directory, env, self.log_path, self.log_path, append=True)
        else:
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen([sys.executable, "-m", "celery", *args], cwd=directory, env=env,
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def sent_slots(self) -> list[str]:
        """Slot times (ISO) this process enqueued, from its log."""
        return [line.rsplit("for slot ", 1)[1].strip() for line in self.log().splitlines() if "for slot " in line]

    def kill(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(10)


def recurring_cli(directory: Path, *args: str) -> str:
    """``celery -A recapp sqlq recurring <args>`` (forked from the zygote like the other one-shot commands);
    fails the test unless it exits 0, and returns its output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(directory), str(REPO)])}
    argv = ["-A", "recapp", "sqlq", "recurring", *args]
    if forking_enabled():
        out = zygote().run(argv, directory, env, timeout=120)
    else:
        out = subprocess.run([sys.executable, "-m", "celery", *argv], cwd=directory, env=env, capture_output=True,
                             text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.fixture
def beats(tmp_path):
    started: list[Beat] = []

    def start(name: str, *extra_args: str) -> Beat:
        b = Beat(tmp_path, name, extra_args)
        started.append(b)
        return b
    yield start
    for b in started:
        b.close()


def slot_rows(db_url: str, key: str | None = None) -> list[tuple]:
    """(task_key, slot_at, task_id, manual) of every slot row, oldest slot first."""
    sql = "SELECT task_key, slot_at, task_id, manual FROM sqlq_recurring_executions"
    if key is not None:
        return rows(db_url, sql + " WHERE task_key = :k ORDER BY slot_at", {"k": key})
    return rows(db_url, sql + " ORDER BY slot_at")


def job_headers(db_url: str) -> list[dict]:
    """Every job's message headers (the recurring key and slot among them)."""
    out = []
    for (payload,) in rows(db_url, "SELECT payload FROM sqlq_jobs ORDER BY id"):
        message = json.loads(payload)
        out.append(message.get("headers") or {})
    return out


def has_table(db_url: str) -> bool:
    try:
        rows(db_url, "SELECT 1 FROM sqlq_recurring_executions WHERE 1 = 0")
        return True
    except Exception:
        return False


def now() -> float:
    return time.time()
