"""Workers on one broker database, a producer, and what they leave behind: for the worker lifecycle,
fencing and fault tests (tests/processes).

Tasks record ``start`` and ``end`` in a small SQLite file of their own (``marks.sqlite3``, independent of
the broker database), so a test can tell which worker ran what, how often, and whether it ran to the end.
The job-state helpers read the store's tables in one transaction and check the registry's invariants.
"""
from __future__ import annotations

import sqlite3
import time
import warnings
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import select

from celery_sqlbackend.options import Options
from celery_sqlbackend.store import Store
from tests.harness import CeleryWorker, wait_until, write_app

HEARTBEAT = 1.0
THRESHOLD = 4.0

TASKS = '''
import os
import sqlite3
import time

MARKS = {marks!r}


def _mark(event, key, request):
    for _ in range(200):
        try:
            conn = sqlite3.connect(MARKS, timeout=30)
            try:
                with conn:
                    conn.execute("insert into marks values (?, ?, ?, ?, ?)",
                                 (key, event, request.hostname, os.getpid(), time.time()))
                return
            finally:
                conn.close()
        except sqlite3.OperationalError:
            time.sleep(0.05)


@app.task(bind=True)
def job(self, key, seconds):
    _mark("start", key, self.request)
    time.sleep(seconds)
    _mark("end", key, self.request)


@app.task(bind=True, acks_late=True)
def late_job(self, key, seconds):
    _mark("start", key, self.request)
    time.sleep(seconds)
    _mark("end", key, self.request)
'''


def transport_options(**overrides) -> dict[str, Any]:
    return {"create_tables": True, "heartbeat_interval": HEARTBEAT, "alive_threshold": THRESHOLD,
            "polling_interval": 0.1, "max_releases": 3, **overrides}


class Cluster:
    """Workers on one broker database, a producer, and the marks the tasks leave."""

    def __init__(self, directory: Path, db_url: str, **options) -> None:
        self.directory = Path(directory)
        self.db_url = db_url
        self.options = transport_options(**options)
        self.marks_path = self.directory / "marks.sqlite3"
        conn = sqlite3.connect(self.marks_path)
        conn.execute("pragma journal_mode=wal")
        conn.execute("create table marks (key text, event text, hostname text, pid int, at real)")
        conn.commit()
        conn.close()
        write_app(self.directory, f"sqlq+{db_url}", extra_conf={
            "broker_transport_options": self.options,
            "worker_prefetch_multiplier": 1,
            "task_ignore_result": True,
            "worker_enable_remote_control": False,
            "broker_connection_retry_on_startup": True,
        }, tasks_source=TASKS.format(marks=str(self.marks_path)))
        self.app = Celery("producer", broker=f"sqlq+{db_url}", broker_transport_options=self.options)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            self.store = Store(db_url, Options.from_mapping(self.options))
        self.store.ensure_schema()
        self.workers: list[CeleryWorker] = []
        self.keys: dict[str, str] = {}          # key -> celery task id

    # ------------------------------------------------------------------ workers

    def worker(self, name: str, queues="main", concurrency: int = 1, ready: bool = True) -> CeleryWorker:
        w = CeleryWorker(self.directory, hostname=f"{name}@%h", queues=queues, concurrency=concurrency)
        self.workers.append(w)
        return w.wait_ready(60) if ready else w

    def close(self) -> None:
        for w in self.workers:
            w.cont()
            w.close()
        self.app.close()
        self.store.engine.dispose()

    # ------------------------------------------------------------------ jobs

    def send(self, key: str, seconds: float, late: bool = False, queue: str = "main") -> str:
        name = "testapp.late_job" if late else "testapp.job"
        result = self.app.send_task(name, args=[key, seconds], queue=queue)
        self.keys[key] = result.id
        return result.id

    def job_id(self, key: str) -> int:
        j = self.store.t.jobs
        return self.store.read(lambda c: c.execute(select(j.c.id).where(j.c.task_id == self.keys[key])).scalar())

    def marks(self, key: str | None = None) -> list[tuple]:
        conn = sqlite3.connect(self.marks_path, timeout=30)
        try:
            sql = "select key, event, hostname, pid, at from marks"
            args: tuple = ()
            if key is not None:
                sql += " where key = ?"
                args = (key,)
            return conn.execute(sql + " order by at", args).fetchall()
        finally:
            conn.close()

    def started(self, key: str, hostname_prefix: str | None = None) -> list[tuple]:
        return [m for m in self.marks(key) if m[1] == "start"
                and (hostname_prefix is None or m[2].startswith(hostname_prefix + "@"))]

    def ended(self, key: str, hostname_prefix: str | None = None) -> list[tuple]:
        return [m for m in self.marks(key) if m[1] == "end"
                and (hostname_prefix is None or m[2].startswith(hostname_prefix + "@"))]

    # ------------------------------------------------------------------ database

    def snapshot(self) -> dict[str, Any]:
        """Every state table, read in one consistent snapshot (REPEATABLE READ on a server)."""
        conn = self.store.engine.connect()
        try:
            if self.store.dialect.name != "sqlite":   # one snapshot for every table read below
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            else:
                conn = conn.execution_options(sqlq_read_only=True)
            with conn.begin():
                return _snapshot(conn, self.store.t)
        finally:
            conn.close()

    def processes_named(self, name: str, snap=None) -> list:
        snap = snap or self.snapshot()
        return [p for p in snap["processes"].values() if p.name.startswith(name + "@")]

    def failed(self, job_id: int, snap=None):
        snap = snap or self.snapshot()
        return snap["failed"].get(job_id)


def utc_ts(dt) -> float:
    """A naive-UTC datetime from the store as a POSIX timestamp."""
    from datetime import timezone
    return dt.replace(tzinfo=timezone.utc).timestamp()


def wait_for_claims(cluster: Cluster, n: int, process_name: str, timeout: float = 30.0, started: int = 0) -> None:
    """Wait for ``n`` claims by ``process_name``, ``started`` of them recorded as started (early acks:
    the worker writes those marks in batches, a few milliseconds after the task starts)."""
    def claimed():
        snap = cluster.snapshot()
        mine = {p.id for p in cluster.processes_named(process_name, snap)}
        claims = [c for c in snap["claimed"].values() if c.process_id in mine]
        return len(claims) >= n and sum(1 for c in claims if c.acked_at is not None) >= started
    wait_until(claimed, timeout, 0.1, f"{n} claim(s) by {process_name}, {started} recorded as started")


def now() -> float:
    return time.time()


# --- job states --------------------------------------------------------------------------------

def _snapshot(conn, t) -> dict[str, Any]:
    return {
        "jobs": {r.id: r for r in conn.execute(select(t.jobs.c.id, t.jobs.c.task_id, t.jobs.c.finished_at,
                                                      t.jobs.c.releases, t.jobs.c.deliveries))},
        "ready": set(conn.execute(select(t.ready.c.job_id)).scalars()),
        "scheduled": set(conn.execute(select(t.scheduled.c.job_id)).scalars()),
        "claimed": {r.job_id: r for r in conn.execute(select(t.claimed))},
        "failed": {r.job_id: r for r in conn.execute(select(t.failed))},
        "processes": {r.id: r for r in conn.execute(select(t.processes))},
    }


def snapshot(store) -> dict[str, Any]:
    """Every table that defines a job's state, read in one transaction."""
    return store.read(_snapshot, store.t)


def states_of(snap) -> dict[int, str]:
    """job id -> "ready" | "scheduled" | "claimed" | "failed" | "finished" | "lost" | "a+b" (broken)."""
    out = {}
    for job_id, job in snap["jobs"].items():
        found = [name for name in ("ready", "scheduled", "claimed", "failed") if job_id in snap[name]]
        if job.finished_at is not None:
            found.append("finished")
        out[job_id] = "+".join(found) if found else "lost"
    return out


def job_states(store) -> dict[int, str]:
    return states_of(snapshot(store))


def invariant_violations(snap) -> list[str]:
    """The invariants of the issue, as a list of what is wrong (empty: all hold)."""
    problems = []
    for job_id, state in states_of(snap).items():
        if "+" in state or state == "lost":
            problems.append(f"job {job_id} is {state}")
    for job_id, claim in snap["claimed"].items():
        if claim.process_id not in snap["processes"]:
            problems.append(f"job {job_id} is claimed by process {claim.process_id}, which is not registered")
    return problems
