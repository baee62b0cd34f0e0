"""An app with recording tasks, importable in the test process (to publish) and run by real workers."""
from __future__ import annotations

import importlib
import sys

import pytest

from tests.harness import write_app

TASKS = '''
import os, time

def _mark(text):
    fd = os.open(os.environ["RUNS_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, (text + "\\n").encode())
    finally:
        os.close(fd)

@app.task(name="t.record")
def record(label):
    _mark(f"{label} {time.time():.6f}")
    return label

@app.task(name="t.add")
def add(x, y):
    return x + y

@app.task(name="t.total")
def total(values):
    return sum(values)

@app.task(name="t.unique_running", sqlq_unique="{0}")
def unique_running(key, label=""):
    _mark(f"{label or key} {time.time():.6f}")

@app.task(name="t.unique_queued", sqlq_unique="{0}", sqlq_unique_for="queued")
def unique_queued(key, label=""):
    _mark(f"{label or key} {time.time():.6f}")

@app.task(name="t.unique_for", sqlq_unique="acct-{account}", sqlq_unique_for=600)
def unique_for(account):
    _mark(f"for-{account} {time.time():.6f}")

@app.task(name="t.unique_fails", sqlq_unique="{0}")
def unique_fails(key):
    raise ValueError("boom")

@app.task(name="t.unique_retries", sqlq_unique="{0}", bind=True, max_retries=1, default_retry_delay=0)
def unique_retries(self, key):
    _mark(f"try-{self.request.retries} {time.time():.6f}")
    if self.request.retries == 0:
        raise self.retry()
'''


def conf(polling_interval: float = 0.05) -> dict:
    return {"broker_transport_options": {"create_tables": True, "polling_interval": polling_interval},
            "worker_prefetch_multiplier": 1, "broker_connection_retry_on_startup": True,
            "result_expires": None}


def load_app(directory, db_url: str, polling_interval: float = 0.05):
    write_app(directory, f"sqlq+{db_url}", result_backend=f"sqlq+{db_url}", extra_conf=conf(polling_interval),
              tasks_source=TASKS)
    sys.modules.pop("testapp", None)
    return importlib.import_module("testapp")


@pytest.fixture
def app_dir(tmp_path, db_url, monkeypatch):
    """(directory, the testapp module, the runs file): the module publishes from this process."""
    runs = tmp_path / "runs.txt"
    monkeypatch.setenv("RUNS_FILE", str(runs))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path, load_app(tmp_path, db_url), runs
    sys.modules.pop("testapp", None)


def labels(runs) -> list[str]:
    try:
        return [line.split()[0] for line in runs.read_text().splitlines() if line]
    except FileNotFoundError:
        return []


def ran_at(runs, label: str) -> float | None:
    try:
        for line in runs.read_text().splitlines():
            name, at = line.split()
            if name == label:
                return float(at)
    except FileNotFoundError:
        pass
    return None
