"""Rows for dashboard tests, written with SQLAlchemy Core on the store's own tables.

Why not through a worker: the HTTP tests need exact, known states (a failed
job with a given error class, a dead process, a job whose arguments contain
markup) in milliseconds; the browser tests run real workers for the rest.
"""
from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime, timedelta

from sqlalchemy import Connection, insert

from celery_sqlbackend.options import Options
from celery_sqlbackend.store import Store, utcnow


def store_at(url: str) -> Store:
    store = Store(url.removeprefix("sqlq+"), Options(create_tables=True))
    store.create_all()
    return store


def message(task: str, args: list, queue: str, task_id: str) -> str:
    """A kombu message as Celery (protocol 2, JSON) publishes it."""
    body = json.dumps([args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    return json.dumps({
        "body": base64.b64encode(body.encode()).decode(), "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "retries": 0,
                    "argsrepr": repr(tuple(args)), "kwargsrepr": "{}"},
        "properties": {"correlation_id": task_id, "delivery_mode": 2, "priority": 0, "body_encoding": "base64",
                       "delivery_tag": str(uuid.uuid4()), "delivery_info": {"exchange": "", "routing_key": queue}},
    })


def add_job(store: Store, queue: str, task: str, args: list, state: str = "ready", *,
            error_class: str = "ValueError", error: str = "ValueError: boom", process_id: int | None = None,
            created_at: datetime | None = None, conn: Connection | None = None) -> int:
    """One job in ``state`` (ready, scheduled, claimed, failed, finished); returns its id.

    Pass ``conn`` (in a transaction) to add many jobs in one commit."""
    if conn is None:
        with store.engine.begin() as conn:
            return add_job(store, queue, task, args, state, error_class=error_class, error=error,
                           process_id=process_id, created_at=created_at, conn=conn)
    t, now = store.t, utcnow()
    created = created_at or now
    task_id = str(uuid.uuid4())
    job_id = conn.execute(insert(t.jobs).values(
        queue_name=queue, task_name=task, task_id=task_id, priority=0,
        payload=message(task, args, queue, task_id), created_at=created,
        scheduled_at=now + timedelta(hours=1) if state == "scheduled" else None,
        finished_at=now if state == "finished" else None, deliveries=0 if state in ("ready", "scheduled") else 1,
        releases=0)).inserted_primary_key[0]
    if state == "ready":
        conn.execute(insert(t.ready).values(job_id=job_id, queue_name=queue, priority=0, created_at=created))
    elif state == "scheduled":
        conn.execute(insert(t.scheduled).values(job_id=job_id, queue_name=queue, priority=0,
                                                scheduled_at=now + timedelta(hours=1)))
    elif state == "claimed":
        conn.execute(insert(t.claimed).values(job_id=job_id, process_id=process_id, queue_name=queue,
                                              claimed_at=now))
    elif state == "failed":
        conn.execute(insert(t.failed).values(job_id=job_id, queue_name=queue, error_class=error_class,
                                             error=error, failed_at=now))
    return job_id


def add_process(store: Store, name: str, dead: bool = False, queues: tuple[str, ...] = ("default",)) -> int:
    """A registered process; ``dead`` puts its last heartbeat far beyond alive_threshold."""
    t, now = store.t, utcnow()
    beat = now - timedelta(seconds=store.options.alive_threshold * 10) if dead else now
    with store.engine.begin() as conn:
        return conn.execute(insert(t.processes).values(
            kind="worker", name=name, hostname="testhost", pid=4242, pool="prefork", concurrency=2,
            queues=json.dumps(list(queues)), started_at=beat, last_heartbeat_at=beat)).inserted_primary_key[0]
