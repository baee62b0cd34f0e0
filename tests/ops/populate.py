"""Put a store into a known, mixed state through its own statements (no worker needed)."""
from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

from celery_sqlbackend.options import Options
from celery_sqlbackend.store import Store, utcnow


def message(task: str, args: list, queue: str) -> dict:
    """A kombu message as Celery (protocol 2, JSON) would publish it."""
    task_id = str(uuid.uuid4())
    body = json.dumps([args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    return {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "retries": 0,
                    "argsrepr": repr(tuple(args)), "kwargsrepr": "{}"},
        "properties": {"correlation_id": task_id, "delivery_mode": 2, "priority": 0, "body_encoding": "base64",
                       "delivery_tag": str(uuid.uuid4()),
                       "delivery_info": {"exchange": "", "routing_key": queue}},
    }


@dataclass
class Populated:
    store: Store
    ready: dict = field(default_factory=dict)       # queue -> [job ids]
    scheduled: list = field(default_factory=list)
    claimed: list = field(default_factory=list)
    failed: list = field(default_factory=list)      # (job id, error class, task)
    finished: list = field(default_factory=list)
    process_id: int | None = None


def enqueue(store: Store, queue: str, task: str, args: list, eta=None) -> int:
    msg = message(task, args, queue)
    return store.jobs.enqueue(queue=queue, payload=json.dumps(msg), task_name=task,
                   task_id=msg["headers"]["id"], priority=0, now=utcnow(), eta=eta, expires_at=None)


def populate(db_url: str, create_tables: bool = True) -> Populated:
    store = Store(db_url, Options(create_tables=create_tables))
    p = Populated(store)
    now = utcnow()
    p.process_id = store.processes.register(kind="worker", name="ops-test@host", hostname="host", pid=4242,
                           pool="prefork", concurrency=2, queues=json.dumps(["claimq", "failq"]), now=now)
    # Jobs that end up failed (two error classes, two tasks) and finished.
    for i, (err, task) in enumerate([("ProcessPrunedError", "testapp.add"), ("ProcessPrunedError", "testapp.add"),
                                     ("RejectedError", "testapp.boom")]):
        enqueue(store, "failq", task, [i, i])
    for job in store.claims.claim(queues=["failq"], limit=10, process_id=p.process_id, now=now):
        err, task = [("ProcessPrunedError", "testapp.add"), ("ProcessPrunedError", "testapp.add"),
                     ("RejectedError", "testapp.boom")][len(p.failed)]
        store.claims.fail(job_id=job.job_id, process_id=p.process_id, error_class=err,
                error=f"{err}: made up for the test (job {job.job_id})", now=now)
        p.failed.append((job.job_id, err, task))
    for i in range(4):
        enqueue(store, "donequeue", "testapp.add", [i, 1])
    for job in store.claims.claim(queues=["donequeue"], limit=10, process_id=p.process_id, now=now):
        store.claims.finish(job_id=job.job_id, process_id=p.process_id, now=now - timedelta(hours=2), keep=True)
        p.finished.append(job.job_id)
    # One held by the live process, ready work in two queues, one scheduled.
    enqueue(store, "claimq", "testapp.add", [7, 7])
    p.claimed = [j.job_id for j in store.claims.claim(queues=["claimq"], limit=1, process_id=p.process_id, now=now)]
    p.ready["alpha"] = [enqueue(store, "alpha", "testapp.add", [i, 2]) for i in range(3)]
    p.ready["beta"] = [enqueue(store, "beta", "testapp.add", [9, 9])]
    p.scheduled.append(enqueue(store, "alpha", "testapp.add", [5, 5], eta=now + timedelta(hours=1)))
    return p
