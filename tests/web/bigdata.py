"""The issue's large data set, written with set-based SQL (PostgreSQL ``generate_series``).

1,000,000 finished jobs and 100,000 failed jobs over five queues, ten task
names and four error classes, finished over the last week, plus a little
ready, scheduled and claimed work and two processes: the size at which every
dashboard page must still answer quickly.  ``INSERT ... SELECT`` writes it in
seconds, where enqueueing through the store would take minutes.
"""
from __future__ import annotations

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from celery_sqlbackend.options import Options
from celery_sqlbackend.store import Store

#: A kombu message as Celery publishes it (protocol 2, JSON), argument text in ``argsrepr``.
_PAYLOAD = ("'{\"body\": \"W1sxLCAyXSwge30sIHt9XQ==\", \"content-encoding\": \"utf-8\", "
            "\"content-type\": \"application/json\", \"headers\": {\"lang\": \"py\", \"task\": \"proj.tasks.t' "
            "|| (g % 10) || '\", \"id\": \"' || md5(g::text) || '\", \"retries\": 0, \"argsrepr\": \"(' || g "
            "|| ', ''customer-' || (g % 5000) || ''')\", \"kwargsrepr\": \"{}\"}, \"properties\": "
            "{\"correlation_id\": \"' || md5(g::text) || '\", \"delivery_mode\": 2, \"priority\": 0, "
            "\"body_encoding\": \"base64\", \"delivery_tag\": \"' || md5('t' || g) || '\", \"delivery_info\": "
            "{\"exchange\": \"\", \"routing_key\": \"q' || (g % 5) || '\"}}}'")


def populate_large(url: str, finished: int = 1_000_000, failed: int = 100_000, prefix: str = "sqlq_") -> Store:
    """Create the tables at ``url`` (PostgreSQL) and fill them; returns a Store on them."""
    store = Store(url, Options(create_tables=True, table_prefix=prefix))
    store.create_all()
    total = finished + failed
    p = prefix
    engine = create_engine(url, poolclass=NullPool)
    with engine.begin() as conn:
        # The jobs' secondary indexes are built once after the bulk insert (the same definitions, from the
        # store's tables): maintained row by row, they made the insert take ~24 s instead of a few.
        indexes = list(store.t.jobs.indexes)
        for index in indexes:
            index.drop(conn)
        conn.execute(text(
            f"INSERT INTO {p}jobs (id, queue_name, task_name, task_id, priority, payload, created_at, "
            f"finished_at, deliveries, releases) "
            f"SELECT g, 'q' || (g % 5), 'proj.tasks.t' || (g % 10), md5(g::text), 0, {_PAYLOAD}, "
            f"now() at time zone 'utc' - interval '7 days' + (g * interval '7 days' / :total), "
            f"CASE WHEN g % :every = 0 THEN NULL ELSE "
            f"now() at time zone 'utc' - interval '7 days' + (g * interval '7 days' / :total) "
            f"+ interval '2 seconds' END, 1, 0 "
            f"FROM generate_series(1, :total) AS g"), {"total": total, "every": total // failed})
        conn.execute(text(
            f"INSERT INTO {p}failed_executions (job_id, queue_name, error_class, error, failed_at) "
            f"SELECT id, queue_name, (ARRAY['ProcessPrunedError', 'ValueError', 'TimeoutError', "
            f"'MaxReleasesExceeded'])[1 + id % 4], 'Traceback (most recent call last): ... job ' || id, "
            f"created_at + interval '1 second' FROM {p}jobs WHERE finished_at IS NULL"))
        conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{p}jobs', 'id'), :total)"), {"total": total})
        conn.execute(text("SET LOCAL maintenance_work_mem = '256MB'"))   # (index builds in memory)
        for index in indexes:
            index.create(conn)
        # A little live work: ready, scheduled and claimed by a registered process.
        conn.execute(text(
            f"INSERT INTO {p}processes (kind, name, hostname, pid, pool, concurrency, queues, started_at, "
            f"last_heartbeat_at) VALUES ('worker', 'big@host', 'host', 4242, 'prefork', 4, '[\"q0\"]', "
            f"now() at time zone 'utc', now() at time zone 'utc')"))
        for state, extra in (("ready", 1000), ("scheduled", 200), ("claimed", 4)):
            ids = conn.execute(text(
                f"INSERT INTO {p}jobs (queue_name, task_name, task_id, priority, payload, created_at, "
                f"scheduled_at, deliveries, releases) SELECT 'q' || (g % 5), 'proj.tasks.t' || (g % 10), "
                f"md5('{state}' || g), 0, {_PAYLOAD}, now() at time zone 'utc' - interval '1 minute', "
                f"now() at time zone 'utc' + interval '1 hour', 0, 0 "
                f"FROM generate_series(1, :n) AS g RETURNING id, queue_name"), {"n": extra}).all()
            rows = [{"job_id": i, "queue_name": q} for i, q in ids]
            if state == "ready":
                conn.execute(text(f"INSERT INTO {p}ready_executions (job_id, queue_name, priority, created_at) "
                                  f"VALUES (:job_id, :queue_name, 0, now() at time zone 'utc' - interval '1 minute')"),
                             rows)
            elif state == "scheduled":
                conn.execute(text(f"INSERT INTO {p}scheduled_executions (job_id, queue_name, priority, "
                                  f"scheduled_at) VALUES (:job_id, :queue_name, 0, "
                                  f"now() at time zone 'utc' + interval '1 hour')"), rows)
            else:
                conn.execute(text(f"INSERT INTO {p}claimed_executions (job_id, process_id, queue_name, "
                                  f"claimed_at) SELECT :job_id, max(id), :queue_name, now() at time zone 'utc' "
                                  f"FROM {p}processes"), rows)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))
    engine.dispose()
    return store
