"""An app with limited tasks that record when they start and end, importable here (to publish)
and run by real workers; and the checks of those records."""
from __future__ import annotations

import importlib
import sys
from collections import defaultdict

import pytest

from tests.harness import write_app

TASKS = '''
import os, time
from celery_sqlbackend import Concurrency, Rate

def _mark(*fields):
    fd = os.open(os.environ["RUNS_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, (" ".join(str(f) for f in fields) + "\\n").encode())
    finally:
        os.close(fd)

@app.task(name="t.sync", sqlq_limits=[Concurrency(2, key="account:{account}", duration=900)])
def sync(account, n, seconds=0.05):
    start = time.time()
    time.sleep(seconds)
    _mark("sync", account, n, f"{start:.6f}", f"{time.time():.6f}")

@app.task(name="t.partner", sqlq_limits=[Rate("10/s", key="api:{0}")], bind=True)
def partner(self, name, n):
    claimed = self.request.properties["delivery_info"]["sqlq_claimed_at"]
    _mark("partner", name, n, f"{time.time():.6f}", f"{claimed:.6f}")

@app.task(name="t.hang", sqlq_limits=[Concurrency(1, key="hang", duration=float(os.environ.get("HANG_DURATION", 900)))])
def hang(n):
    _mark("hang", n, f"{time.time():.6f}")
    if n == 0:
        time.sleep(600)

@app.task(name="t.plain")
def plain(n):
    _mark("plain", n, f"{time.time():.6f}")
'''


def conf(polling_interval: float = 0.05, **transport) -> dict:
    return {"broker_transport_options": {"create_tables": True, "polling_interval": polling_interval, **transport},
            "worker_prefetch_multiplier": 1, "broker_connection_retry_on_startup": True,
            "result_expires": None, "task_acks_late": False}


def load_app(directory, db_url: str, **transport):
    write_app(directory, f"sqlq+{db_url}", extra_conf=conf(**transport), tasks_source=TASKS)
    sys.modules.pop("testapp", None)
    return importlib.import_module("testapp")


@pytest.fixture
def limits_app(tmp_path, db_url, monkeypatch):
    """(directory, the testapp module, the runs file): the module publishes from this process."""
    runs = tmp_path / "runs.txt"
    monkeypatch.setenv("RUNS_FILE", str(runs))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path, load_app(tmp_path, db_url), runs
    sys.modules.pop("testapp", None)


def records(runs, kind: str) -> list[list[str]]:
    try:
        return [line.split()[1:] for line in runs.read_text().splitlines() if line.startswith(kind + " ")]
    except FileNotFoundError:
        return []


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most of ``spans`` (start, end) that overlap at any moment."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    now = top = 0
    for _, step in events:
        now += step
        top = max(top, now)
    return top


def most_in_window(starts: list[float], window: float) -> int:
    """The most of ``starts`` within any half-open window of ``window`` seconds."""
    starts = sorted(starts)
    top, lo = 0, 0
    for hi, at in enumerate(starts):
        while starts[lo] <= at - window:
            lo += 1
        top = max(top, hi - lo + 1)
    return top


def by_key(rows: list[list[str]]) -> dict[str, list[list[str]]]:
    out: dict[str, list[list[str]]] = defaultdict(list)
    for row in rows:
        out[row[0]].append(row)
    return out
