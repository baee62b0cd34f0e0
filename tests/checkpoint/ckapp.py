"""The Celery app the checkpoint worker tests run in real ``celery worker`` processes.

Configured by environment variables so one module serves every test:

    CK_DIR        directory holding jobs.sqlite3 (broker) and items.sqlite3 (what was processed)
    CK_BROKER     broker URL (default: sqlq+sqlite:///$CK_DIR/jobs.sqlite3)
    CK_ITEM_DELAY seconds each iteration takes (default 0.0003)
    CK_MAX_RUNTIME  max_job_runtime of the counting task (default: none)
    CK_CHECKPOINT_EVERY  durable checkpoint cadence in iterations (default 100)
    CK_POOL_START_METHOD  worker_pool_start_method (e.g. "spawn")
    CK_SOFT_SHUTDOWN  worker_soft_shutdown_timeout (seconds)
    CK_RESULTS    store results (in the broker's database)
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time

import celery_sqlbackend  # noqa: F401  (registers the sqlq transport)
from celery import Celery, signals

import checkpoint
from checkpoint import IterativeTask

DIR = os.environ["CK_DIR"]
BROKER = os.environ.get("CK_BROKER") or f"sqlq+sqlite:///{DIR}/jobs.sqlite3"
ITEMS_DB = os.path.join(DIR, "items.sqlite3")

app = Celery("ckapp", broker=BROKER)
app.conf.update(
    broker_connection_retry_on_startup=True,
    broker_transport_options={"polling_interval": 0.05, "heartbeat_interval": 0.5, "alive_threshold": 2.0,
                              "dispatch_interval": 0.2},
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
    task_ignore_result=True,
)
if os.environ.get("CK_RESULTS"):
    app.conf.update(result_backend=BROKER, task_ignore_result=False)
if os.environ.get("CK_SOFT_SHUTDOWN"):
    app.conf.worker_soft_shutdown_timeout = float(os.environ["CK_SOFT_SHUTDOWN"])
if os.environ.get("CK_POOL_START_METHOD"):
    app.conf.worker_pool_start_method = os.environ["CK_POOL_START_METHOD"]

_local = threading.local()


def db() -> sqlite3.Connection:
    conn = getattr(_local, "conn", None)
    if conn is None or getattr(_local, "pid", None) != os.getpid():
        conn = sqlite3.connect(ITEMS_DB, timeout=30, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        _local.conn, _local.pid = conn, os.getpid()
    return conn


def init_items_db() -> None:
    conn = db()
    conn.executescript("""
        CREATE TABLE IF NOT EXISTS items (item INTEGER PRIMARY KEY, times INTEGER NOT NULL);
        CREATE TABLE IF NOT EXISTS runs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, task_id TEXT, event TEXT, pid INTEGER,
            cursor TEXT, iterations INTEGER, times_interrupted INTEGER, retries INTEGER, at REAL);
        CREATE TABLE IF NOT EXISTS marks (name TEXT PRIMARY KEY, at REAL, pid INTEGER);
    """)


def mark(name: str) -> None:
    db().execute("INSERT OR REPLACE INTO marks VALUES (?, ?, ?)", (name, time.time(), os.getpid()))


@signals.worker_ready.connect
def _ready(sender=None, **kwargs):
    init_items_db()
    mark(f"ready:{os.getpid()}")


class CountTo(IterativeTask):
    """Records every item it processes; ``times`` > 1 means an item was processed twice."""

    name = "ck.count_to"
    checkpoint_every = int(os.environ.get("CK_CHECKPOINT_EVERY", "100"))
    checkpoint_interval = 3600.0
    max_job_runtime = float(os.environ["CK_MAX_RUNTIME"]) if os.environ.get("CK_MAX_RUNTIME") else None

    def build_enumerator(self, n, *, cursor=None):
        return self.enumerate.integers(0, n, cursor=cursor)

    def each_iteration(self, item, n):
        db().execute("INSERT INTO items VALUES (?, 1) ON CONFLICT(item) DO UPDATE SET times = times + 1", (item,))
        delay = float(os.environ.get("CK_ITEM_DELAY", "0.0003"))
        if delay:
            time.sleep(delay)

    def _record(self, event):
        p = self.progress
        db().execute(
            "INSERT INTO runs (task_id, event, pid, cursor, iterations, times_interrupted, retries, at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (self.request.id, event, os.getpid(), repr(p.cursor), p.iterations, p.times_interrupted,
             self.request.retries, time.time()))

    def on_start(self, n):
        self._record("start")

    def on_resume(self, n):
        self._record("resume")

    def on_shutdown(self, n):
        self._record("shutdown")

    def on_complete(self, n):
        self._record("complete")
        return {"iterations": self.progress.iterations, "times_interrupted": self.progress.times_interrupted}


count_to = app.register_task(CountTo())


@app.task(name="ck.watch_flag")
def watch_flag(limit=30.0):
    """Spin until the stop flag is set; record when it was first seen, from inside the pool process."""
    mark("watch_started")
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if checkpoint.stopping():
            mark("flag_seen")
            return True
        time.sleep(0.001)
    return False
