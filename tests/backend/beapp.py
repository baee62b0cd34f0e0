"""The Celery app that the result backend tests run in real ``celery worker`` processes.

Configured from the environment so one module serves every test:

    BE_DB        SQLAlchemy URL of the store (broker, results, and the body_runs table)
    BE_EXPIRES   result_expires in seconds (default 3600)
"""
from __future__ import annotations

import os
import time

import celery_sqlbackend  # noqa: F401  (registers the sqlq transport)
from celery import Celery
from sqlalchemy import create_engine, text


def make_app(db_url: str, **conf) -> Celery:
    app = Celery("beapp", broker=f"sqlq+{db_url}", backend=f"sqlq+{db_url}")
    app.conf.update(
        broker_connection_retry_on_startup=True,
        broker_transport_options={"polling_interval": 0.05, "create_tables": True,
                                  "heartbeat_interval": 1.0, "alive_threshold": 5.0, "dispatch_interval": 0.1},
        result_extended=True,
        task_track_started=True,
        result_expires=int(os.environ.get("BE_EXPIRES", "3600")),
        worker_prefetch_multiplier=4,
        worker_hijack_root_logger=False,
        result_chord_join_timeout=30,
    )
    app.conf.update(conf)
    return app


app = make_app(os.environ.get("BE_DB", "sqlite:////tmp/beapp-unused.sqlite3"))
_engine = None


def _db():
    global _engine
    if _engine is None or _engine[0] != os.getpid():
        _engine = (os.getpid(), create_engine(os.environ["BE_DB"]))
    return _engine[1]


@app.task(name="beapp.ping")
def ping():
    return "pong"


@app.task(name="beapp.add")
def add(x, y):
    return x + y


@app.task(name="beapp.tsum")
def tsum(values):
    return sum(values)


class Boom(Exception):
    pass


@app.task(name="beapp.fail")
def fail(message):
    raise Boom(message)


@app.task(name="beapp.unserializable")
def unserializable():
    return object()


@app.task(name="beapp.retry_later", bind=True, max_retries=3)
def retry_later(self):
    # Parks in RETRY: the next attempt is an hour away.
    raise self.retry(exc=ValueError("try again in an hour"), countdown=3600)


@app.task(name="beapp.wait_for_gate")
def wait_for_gate(path, deadline=30.0):
    """Runs until ``path`` exists (so the test can see STARTED), polling with a deadline."""
    end = time.monotonic() + deadline
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise TimeoutError(path)
        time.sleep(0.01)
    return "opened"


@app.task(name="beapp.record_body")
def record_body(results, tag):
    """A chord body: counts its own executions in the database, returns the header sum."""
    with _db().begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS be_body_runs (tag VARCHAR(64), total INTEGER)"))
        conn.execute(text("INSERT INTO be_body_runs (tag, total) VALUES (:tag, :total)"),
                     {"tag": tag, "total": sum(results)})
    return sum(results)
