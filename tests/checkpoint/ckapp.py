"""The Celery app the checkpoint worker tests run in real ``celery worker`` processes.

Configured by environment variables so one module serves every test:

    CK_DIR        directory holding jobs.sqlite3 (broker) and items.sqlite3 (what was processed)
    CK_BROKER     broker URL (default: sqlq+sqlite:///$CK_DIR/jobs.sqlite3)
    CK_ITEM_DELAY seconds each iteration takes (default 0.0003)
    CK_MAX_RUNTIME  max_job_runtime of the counting task (default: none)
    CK_CHECKPOINT_EVERY  durable checkpoint cadence in iterations (default 100)
    CK_POOL_START_METHOD  worker_pool_start_method (e.g. "spawn")
    CK_SOFT_SHUTDOWN  worker_soft_shutdown_timeout (seconds)
    CK_RESULTS    store results (in the broker's database, or CK_BACKEND)
    CK_BACKEND    result backend URL (sets CK_RESULTS)
    CK_STORE      checkpoint_store_url (durable cursors when the broker is not sqlq)
    CK_QUEUE      task_default_queue (isolates tests sharing one Redis)
    CK_VISIBILITY Redis visibility_timeout (seconds); restores unacked messages every second
    CK_DEFAULT_RUNTIME  1: leave max_job_runtime at the library default
    CK_BACKOFF    interruption_backoff of the counting tasks (default 1.0; the library's is 3.0)
"""
from __future__ import annotations

import gc
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
if BROKER.startswith("sqlq+"):
    transport_options = {"polling_interval": 0.05, "heartbeat_interval": 0.5, "alive_threshold": 2.0,
                         "dispatch_interval": 0.2}
else:
    transport_options = {"polling_interval": 0.05}
    if os.environ.get("CK_VISIBILITY"):
        transport_options.update(visibility_timeout=float(os.environ["CK_VISIBILITY"]),
                                 unacked_restore_interval=1, unacked_restore_throttle=1)
app.conf.update(
    broker_connection_retry_on_startup=True,
    broker_transport_options=transport_options,
    worker_prefetch_multiplier=int(os.environ.get("CK_PREFETCH", "1")),
    worker_hijack_root_logger=False,
    task_ignore_result=True,
    # When a pool child dies mid-task, Celery waits this long for a result that cannot come before it
    # declares the job lost (default 10 s). The killed-child tests are about what happens next.
    worker_lost_wait=1.0,
)
if os.environ.get("CK_QUEUE"):
    app.conf.task_default_queue = os.environ["CK_QUEUE"]
if os.environ.get("CK_STORE"):
    app.conf.checkpoint_store_url = os.environ["CK_STORE"]
if os.environ.get("CK_RESULTS") or os.environ.get("CK_BACKEND"):
    app.conf.update(result_backend=os.environ.get("CK_BACKEND") or BROKER, task_ignore_result=False)
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
    # The test harness forks workers from a process that has imported Celery, SQLAlchemy and the plugin
    # (tests/support/zygote.py). At exit the interpreter's last garbage collection walks every object
    # inherited that way, copying each page it touches: 1-2 s per worker exit on a busy two-core machine,
    # and these tests stop workers again and again. Objects alive now live as long as the worker anyway.
    gc.freeze()


class CountTo(IterativeTask):
    """Records every item it processes; ``times`` > 1 means an item was processed twice."""

    name = "ck.count_to"
    checkpoint_every = int(os.environ.get("CK_CHECKPOINT_EVERY", "100"))
    checkpoint_interval = 3600.0
    # A job interrupted by TERM comes back after this countdown. The library's 3 s outlasts a stopping
    # worker's last drain; these tests restart the worker after every TERM and would wait out most of it.
    interruption_backoff = float(os.environ.get("CK_BACKOFF", "1.0"))
    max_job_runtime = (float(os.environ["CK_MAX_RUNTIME"]) if os.environ.get("CK_MAX_RUNTIME")
                       else None if os.environ.get("CK_DEFAULT_RUNTIME") else float("inf"))

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

    def on_start(self, n, *args):
        self._record("start")

    def on_resume(self, n, *args):
        self._record("resume")

    def on_shutdown(self, n, *args):
        self._record("shutdown")

    def on_complete(self, n, *args):
        self._record("complete")
        return {"iterations": self.progress.iterations, "times_interrupted": self.progress.times_interrupted}


count_to = app.register_task(CountTo())


class Boom(Exception):
    """Raised on purpose, once per listed item."""


def first_time(name: str) -> bool:
    """True the first time ``name`` is asked for, across processes and runs."""
    return db().execute("INSERT OR IGNORE INTO marks VALUES (?, ?, ?)", (name, time.time(), os.getpid())).rowcount == 1


class Flaky(CountTo):
    """CountTo that raises Boom (autoretry) at ``fail_at`` and calls self.retry() at ``retry_at``, once each."""

    name = "ck.flaky"
    autoretry_for = (Boom,)
    max_retries = 5
    default_retry_delay = 0
    retry_backoff = False

    def build_enumerator(self, n, fail_at, retry_at, *, cursor=None):
        return self.enumerate.integers(0, n, cursor=cursor)

    def each_iteration(self, item, n, fail_at, retry_at):
        if item in fail_at and first_time(f"raised:{item}"):
            raise Boom(f"item {item}")
        if item in retry_at and first_time(f"retried:{item}"):
            raise self.retry(countdown=0)
        super().each_iteration(item, n)


flaky = app.register_task(Flaky())


class WalkRows(IterativeTask):
    """Walks typed_rows by the key column(s) named ``key``; records each row id as an item."""

    name = "ck.walk_rows"
    checkpoint_every = 50
    checkpoint_interval = 3600.0
    max_job_runtime = float(os.environ.get("CK_MAX_RUNTIME") or "inf")

    def build_enumerator(self, url, key, offset, *, cursor=None):
        import typed_rows
        return self.enumerate.sqlalchemy_rows(typed_rows.select_all(), bind=typed_rows.engine(url), cursor=cursor,
                                              columns=typed_rows.key_columns(key), batch_size=37)

    def each_iteration(self, row, url, key, offset):
        CountTo.each_iteration(self, offset + row.id, 0)

    def on_start(self, *args):
        CountTo._record(self, "start")

    def on_resume(self, *args):
        CountTo._record(self, "resume")

    def on_complete(self, url, key, offset):
        CountTo._record(self, "complete")


walk_rows = app.register_task(WalkRows())


def _count_enumerator(task, n, *, cursor=None):
    return task.enumerate.integers(0, n, cursor=cursor)


def _count_complete(task, n):
    CountTo._record(task, "complete")
    return {"iterations": task.progress.iterations, "times_interrupted": task.progress.times_interrupted}


@checkpoint.iterative_task(
    enumerator=_count_enumerator, name="ck.decorated_count", checkpoint_every=100, checkpoint_interval=3600.0,
    max_job_runtime=float(os.environ.get("CK_MAX_RUNTIME") or "inf"),
    on_start=lambda task, n: CountTo._record(task, "start"),
    on_resume=lambda task, n: CountTo._record(task, "resume"),
    on_complete=_count_complete)
def decorated_count(item, n):
    """The shared_task form (no app=): what Django's autodiscovery registers."""
    CountTo.each_iteration(None, item, n)


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


class PartitionedCount(CountTo):
    """CountTo over this run's share of range(n) (checkpoint.partition)."""

    name = "ck.partitioned_count"

    def build_enumerator(self, n, *, cursor=None):
        lo, hi = self.partition.range(0, n)
        return self.enumerate.integers(lo, hi, cursor=cursor)

    def on_complete(self, n, *args):
        self._record("complete")
        return {"partition": self.partition.to_message(), "iterations": self.progress.iterations}


partitioned_count = app.register_task(PartitionedCount())


@app.task(name="ck.sum_partitions")
def sum_partitions(results):
    return {"partitions": sorted(r["partition"][0] for r in results),
            "iterations": sum(r["iterations"] for r in results)}
