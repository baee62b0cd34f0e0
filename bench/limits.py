"""What limits cost (issue #17), per database URL, in one thread, no Celery.

    .venv/bin/python bench/limits.py sqlite:////tmp/bl.sqlite3 postgresql+psycopg://u@host/db

* **plain claim loop**: the claim loop of ``claim_loop.py`` (finishes of the last batch, then the
  next ``--batch``) over ``--jobs`` jobs without limits: with no limit rows at all, then with
  ``--blocked`` jobs blocked on Concurrency keys: what jobs without limits pay for others' limits.
* **release + let in**: a Concurrency(``--batch``) key with ``--blocked`` jobs waiting on it:
  the time of one ``store.limits.release`` (give a slot back, let the next job in).
* **rate claim**: ``store.limits.claim_rated`` of ``--batch`` jobs, with ``--blocked`` jobs
  blocked on 10 rate keys (a rate high enough never to hold them back).

``--rounds`` rounds, the URLs taking turns (this machine's speed drifts); medians.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from celery_sqlbackend.options import Options  # noqa: E402
from celery_sqlbackend.store import Store, utcnow  # noqa: E402
from celery_sqlbackend.store.admission import JobLimits  # noqa: E402
from celery_sqlbackend.store.jobs import NewJob, insert_one  # noqa: E402

from claim_loop import timed_loops  # noqa: E402  (bench/ is this script's own directory on sys.path)


def clear(store: Store) -> None:
    t = store.t
    with store.engine.begin() as conn:
        for table in (t.blocked, t.semaphore_holds, t.semaphores, t.rate_keys, t.job_limits, t.claimed, t.ready,
                      t.jobs):
            conn.execute(table.delete())


def limited(store: Store, n: int, limits) -> None:
    """``n`` jobs enqueued with ``limits(i)``, 500 per transaction."""
    now = utcnow()
    for start in range(0, n, 500):
        def write(conn, start=start):
            for i in range(start, min(n, start + 500)):
                insert_one(conn, store.t, store.dialect, NewJob(queue="limited", payload="{}", task_name="b",
                                                                 task_id=None, priority=0, created_at=now,
                                                                 limits=limits(i)))
        store.run(write)


def plain_loop(store: Store, jobs: int, batch: int, blocked: int) -> list[float]:
    clear(store)
    if blocked:
        limited(store, blocked, lambda i: JobLimits(concurrency_key=f"k{i % 100}", concurrency_limit=1,
                                                    concurrency_duration=3600.0))
    t, now = store.t, utcnow()
    with store.engine.begin() as conn:
        ids = [conn.execute(t.jobs.insert().values(queue_name="bench", priority=i % 3, payload="{}", created_at=now,
                                                   deliveries=0, releases=0)).inserted_primary_key[0]
               for i in range(jobs)]
        conn.execute(t.ready.insert(), [dict(job_id=i, queue_name="bench", priority=n % 3, created_at=now)
                                        for n, i in enumerate(ids)])
    return timed_loops(store, batch)


def release_cost(store: Store, batch: int, blocked: int) -> list[float]:
    clear(store)
    limited(store, blocked + batch, lambda i: JobLimits(concurrency_key="one", concurrency_limit=batch,
                                                        concurrency_duration=3600.0))
    holding = [row[0] for row in store.run(lambda conn: conn.execute(
        store.t.semaphore_holds.select().with_only_columns(store.t.semaphore_holds.c.job_id)).all())]
    timings = []
    for _ in range(200):
        job_id = holding.pop(0)
        start = time.perf_counter()
        holding += store.limits.release(job_ids=[job_id], now=utcnow())
        timings.append(time.perf_counter() - start)
    return timings


def rate_claim_cost(store: Store, batch: int, blocked: int) -> list[float]:
    clear(store)
    limited(store, blocked, lambda i: JobLimits(rate_key=f"r{i % 10}", rate_limit=1_000_000, rate_period=1.0))
    pid = store.processes.register(kind="bench", name="bench", hostname="h", pid=1, pool=None, concurrency=None,
                                   queues="[]", now=utcnow())
    timings = []
    for _ in range(200):
        start = time.perf_counter()
        claimed, _ = store.limits.claim_rated(queues=["limited"], limit=batch, process_id=pid, now=utcnow())
        timings.append(time.perf_counter() - start)
        assert claimed
    return timings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("urls", nargs="+")
    ap.add_argument("--jobs", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--blocked", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prefix", default="blm_")
    args = ap.parse_args()
    stores = {url: Store(url, Options(create_tables=True, table_prefix=args.prefix)) for url in args.urls}
    for store in stores.values():
        store.create_all()
    runs = {"plain claim loop, no limit rows": lambda s: plain_loop(s, args.jobs, args.batch, 0),
            f"plain claim loop, {args.blocked:,} blocked": lambda s: plain_loop(s, args.jobs, args.batch, args.blocked),
            f"release + let in, {args.blocked:,} blocked on the key": lambda s: release_cost(s, args.batch, args.blocked),
            f"rate claim of {args.batch}, {args.blocked:,} blocked": lambda s: rate_claim_cost(s, args.batch, args.blocked)}
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for name, run in runs.items():
            for url, store in stores.items():
                results.setdefault((name, url), []).extend(run(store))
    for (name, url), timings in results.items():
        timings.sort()
        print(f"{url.split('://', 1)[0]:20} {name:48} median {statistics.median(timings) * 1000:6.2f} ms   "
              f"p90 {timings[int(len(timings) * 0.9)] * 1000:6.2f} ms   ({len(timings)})")


if __name__ == "__main__":
    main()
