"""The demo's Celery app: broker and results in one SQLite file, no server.

``$DEMO_DIR`` holds the database (``examples/demo.py`` sets it).
"""
import os
import time

import celery_sqlbackend  # noqa: F401  (registers the sqlq+ transport)
from celery import Celery

DB = f"sqlite:///{os.environ.get('DEMO_DIR', '.')}/jobs.sqlite3"

app = Celery("demo_app", broker=f"sqlq+{DB}", backend=f"sqlq+{DB}")
app.conf.update(broker_connection_retry_on_startup=True, worker_prefetch_multiplier=1,
                task_track_started=True)


@app.task
def add(x, y):
    return x + y


@app.task
def report(label):
    """Record when the job ran, to show the order."""
    return [label, time.time()]


@app.task
def divide(x, y):
    return x / y
