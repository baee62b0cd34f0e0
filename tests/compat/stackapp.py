"""The Celery app of the declared-support tests (tests/compat), run by real ``celery worker`` processes.

Configured from the environment so that the test process (the producer) and
the worker build the same app:

    STACK_DB         SQLAlchemy URL of the store (broker and results)
    STACK_RUNS       file each task appends one line to (O_APPEND: what ran, and how often)
    STACK_PREFIX     table prefix, given as the ``sqlq_table_prefix`` setting (not as a transport option)
    STACK_POLL       sqlq_polling_interval (default 0.05 s)
    STACK_BEAT_EVERY if set, beat sends ``stack.record("beat")`` every that many seconds
"""
from __future__ import annotations

import os
import time

import celery_sqlbackend  # noqa: F401  (registers the sqlq transport)
from celery import Celery

DB = os.environ.get("STACK_DB", "sqlite:////tmp/stackapp-unused.sqlite3")

app = Celery("stackapp", broker=f"sqlq+{DB}", backend=f"sqlq+{DB}")
app.conf.update(
    broker_connection_retry_on_startup=True,
    # Settings, the way the README documents them (app.conf.sqlq_<option>), for every process of the app.
    sqlq_table_prefix=os.environ.get("STACK_PREFIX", "sqlq_"),
    sqlq_create_tables=True,
    sqlq_polling_interval=float(os.environ.get("STACK_POLL", "0.05")),
    sqlq_heartbeat_interval=1.0,
    sqlq_alive_threshold=5.0,
    sqlq_dispatch_interval=0.1,
    result_compression="zlib",
    result_chord_join_timeout=30,
    worker_hijack_root_logger=False,
    beat_schedule_filename=os.environ.get("STACK_BEAT_FILE", "celerybeat-schedule"),
)
if os.environ.get("STACK_BEAT_EVERY"):
    app.conf.beat_schedule = {"record-beat": {"task": "stack.record", "schedule": float(os.environ["STACK_BEAT_EVERY"]),
                                              "args": ("beat",)}}


def _mark(text: str) -> None:
    fd = os.open(os.environ["STACK_RUNS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, (text + "\n").encode())
    finally:
        os.close(fd)


@app.task(name="stack.record")
def record(label: str) -> str:
    _mark(f"{label} {os.getpid()} {time.time():.6f}")
    return label


@app.task(name="stack.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="stack.tsum")
def tsum(values: list[int]) -> int:
    _mark(f"chord-body {sum(values)}")
    return sum(values)


@app.task(name="stack.fail")
def fail(message: str) -> None:
    raise ValueError(message)


@app.task(name="stack.wait_for")
def wait_for(path: str, label: str) -> str:
    """Runs until ``path`` exists (the test opens the gate), then records ``label``."""
    while not os.path.exists(path):
        time.sleep(0.02)
    _mark(f"{label} {os.getpid()} {time.time():.6f}")
    return label
