"""The worker's claim loop alone, per database URL: what a driver costs.

    .venv/bin/python bench/claim_loop.py mysql+pymysql://u:p@host/db mysql+mysqldb://u:p@host/db

For each URL (a fresh set of tables with ``--prefix``): enqueue ``--jobs``
jobs, then run the loop a worker runs (``store.claims.acks_and_claim``: the
finishes of the last batch, then the next batch of ``--batch``) until the
queue is empty, in one thread, no Celery.  Prints loops/s and the median
and p90 time of one loop; ``--rounds`` rounds per URL, the URLs taking
turns (this machine's speed drifts).  Why: the drain of a real worker mixes
the claim with the pool's work; this isolates the part the driver changes.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import text  # noqa: E402

from celery_sqlbackend.options import Options  # noqa: E402
from celery_sqlbackend.store import Store, utcnow  # noqa: E402


def one_round(store: Store, jobs: int, batch: int) -> list[float]:
    t = store.t
    with store.engine.begin() as conn:
        for table in (t.claimed, t.ready, t.jobs):
            conn.execute(table.delete())
    now = utcnow()
    with store.engine.begin() as conn:
        conn.execute(t.jobs.insert(), [dict(queue_name="bench", priority=i % 3, payload="{}", created_at=now,
                                            deliveries=0, releases=0) for i in range(jobs)])
        conn.execute(text(f"INSERT INTO {t.ready.name} (job_id, queue_name, priority, created_at) "
                          f"SELECT id, queue_name, priority, created_at FROM {t.jobs.name}"))
    return timed_loops(store, batch)


def timed_loops(store: Store, batch: int) -> list[float]:
    """Drain queue "bench" as a worker's claim loop does (the last batch's finishes, then a claim of
    ``batch``), one thread; the time of each loop.  (bench/limits.py runs the same loop.)"""
    pid = store.processes.register(kind="bench", name="bench", hostname="h", pid=1, pool=None, concurrency=None,
                                   queues="[]", now=utcnow())
    finishes: list[tuple[int, int]] = []
    timings = []
    while True:
        start = time.perf_counter()
        _, claimed = store.claims.acks_and_claim(marks=[], finishes=finishes, keep=True, queues=["bench"],
                                                 limit=batch, process_id=pid, now=utcnow())
        timings.append(time.perf_counter() - start)
        if not claimed:
            return timings
        finishes = [(job.job_id, pid) for job in claimed]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("urls", nargs="+")
    ap.add_argument("--jobs", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prefix", default="bcl_")
    args = ap.parse_args()
    stores = {url: Store(url, Options(create_tables=True, table_prefix=args.prefix)) for url in args.urls}
    for store in stores.values():
        store.create_all()
    results: dict[str, list[float]] = {url: [] for url in args.urls}
    for _ in range(args.rounds):
        for url, store in stores.items():
            results[url] += one_round(store, args.jobs, args.batch)
    for url, timings in results.items():
        timings.sort()
        name = url.split("://", 1)[0]
        print(f"{name:24} loops/s {len(timings) / sum(timings):7.0f}   median {statistics.median(timings) * 1000:.2f} ms"
              f"   p90 {timings[int(len(timings) * 0.9)] * 1000:.2f} ms   ({len(timings)} loops of {args.batch})")


if __name__ == "__main__":
    main()
