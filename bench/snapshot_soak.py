"""Queue tables under a held snapshot: drain rate and claim cost while dead rows pile up (PostgreSQL).

    .venv/bin/python bench/snapshot_soak.py                      # a private PostgreSQL, 300,000 jobs a phase
    .venv/bin/python bench/snapshot_soak.py URL --jobs 50000     # a server of yours (a fresh table prefix)

Why: a transaction left open (an idle-in-transaction session, a long report, a replica's
hot_standby_feedback) holds back the xmin horizon, so VACUUM can remove none of the rows deleted since
it began. A queue deletes every row it inserts into ``ready_executions`` and ``claimed_executions``, so
those tables and their indexes fill with dead entries that every claim's index walk must step over.

Three phases on one server, each on fresh tables: **fresh** (autovacuum free to work), **held** (a
REPEATABLE READ transaction that has read a row stays open for the whole phase) and **after** (the held
transaction ends and the flow goes on, on the bloated tables of the held phase: does it recover?). The
flow is the worker's own loop in one thread, no Celery: enqueue ``--chunk`` jobs (jobs + ready rows, one
transaction), then ``store.claims.acks_and_claim`` (the finishes of the last batch, then the next
``--batch``) until the backlog is back to ``--backlog``, so that claims always walk a queue of that size.
Printed per window of ``--window`` jobs: jobs/s through the whole flow, and the median and p90 of one claim
loop; then each phase's median window against the fresh one, and the tables' dead tuples.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import create_engine, insert, text  # noqa: E402
from sqlalchemy.pool import NullPool  # noqa: E402

from celery_sqlbackend.options import Options  # noqa: E402
from celery_sqlbackend.store import Store, utcnow  # noqa: E402
from celery_sqlbackend.store.claim_resume import ResumePoint  # noqa: E402


def flow(store: Store, jobs: int, chunk: int, batch: int, backlog: int, window: int, label: str,
         resume: ResumePoint | None) -> list[dict]:
    """Push ``jobs`` jobs through enqueue and the claim loop; one dict of figures per window.
    ``resume``: where the loop's claims resume, as a worker's do (None: every claim walks from the start)."""
    t = store.t
    pid = store.processes.register(kind="bench", name=f"soak-{label}", hostname="h", pid=1, pool=None,
                                   concurrency=None, queues="[]", now=utcnow())
    finishes: list[tuple[int, int]] = []
    waiting = done = 0
    windows: list[dict] = []
    loops: list[float] = []
    started = time.perf_counter()
    while done < jobs:
        if waiting <= backlog and done + waiting < jobs:
            now = utcnow()
            with store.engine.begin() as conn:
                ids = conn.execute(insert(t.jobs).returning(t.jobs.c.id), [
                    dict(queue_name="soak", priority=0, payload="{}", created_at=now, deliveries=0, releases=0)
                    for _ in range(chunk)]).scalars().all()
                conn.execute(insert(t.ready), [dict(job_id=i, queue_name="soak", priority=0, created_at=now)
                                               for i in ids])
            waiting += chunk
        while waiting > backlog or (done + waiting >= jobs and waiting):
            at = time.perf_counter()
            _, claimed = store.claims.acks_and_claim(marks=[], finishes=finishes, keep=True, queues=["soak"],
                                                     limit=batch, process_id=pid, now=utcnow(), resume=resume)
            loops.append(time.perf_counter() - at)
            finishes = [(job.job_id, pid) for job in claimed]
            waiting -= len(claimed)
            done += len(claimed)
            if not claimed:
                break
            if done // window > len(windows):
                elapsed = time.perf_counter() - started
                loops.sort()
                windows.append({"done": done, "rate": window / elapsed, "median_ms": statistics.median(loops) * 1e3,
                                "p90_ms": loops[int(len(loops) * 0.9)] * 1e3})
                print(f"  {label:6} {done:>8,} jobs  {windows[-1]['rate']:7.0f} jobs/s  claim loop median "
                      f"{windows[-1]['median_ms']:.2f} ms  p90 {windows[-1]['p90_ms']:.2f} ms", flush=True)
                loops, started = [], time.perf_counter()
    store.claims.acks_and_claim(marks=[], finishes=finishes, keep=True, queues=["soak"], limit=0,
                                process_id=pid, now=utcnow())
    return windows


def dead_tuples(store: Store) -> str:
    with store.engine.connect() as conn:
        rows = conn.execute(text("SELECT relname, n_live_tup, n_dead_tup, pg_total_relation_size(relid) "
                                 "FROM pg_stat_user_tables WHERE relname = ANY(:names) ORDER BY relname"),
                            {"names": [store.t.ready.name, store.t.claimed.name, store.t.jobs.name]}).all()
    return ", ".join(f"{name}: {live:,} live / {dead:,} dead, {size / 2**20:.1f} MiB" for name, live, dead, size in rows)


def claim_pages(store: Store, batch: int, resume: ResumePoint | None) -> str:
    """Pages one claim's index walk reads (EXPLAIN ANALYZE, BUFFERS), from the start of the poll index and from
    the resume point: the claim's cost without the machine's speed in it (this shared machine's speed drifts
    by several times within a run).  (From the point: the part after it, where a resumed claim finds its jobs.)"""
    r = store.t.ready.name
    after = resume.after if resume is not None else None
    walks = {"from the start": ""}
    if after is not None:
        walks["from the resume point"] = f"AND priority = {after[0]} AND job_id > {after[1]}"
    said = []
    with store.engine.connect() as conn:
        for name, where in walks.items():
            plan = conn.exec_driver_sql(
                f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT id FROM {r} WHERE queue_name = 'soak' {where} "
                f"ORDER BY priority DESC, job_id LIMIT {batch} FOR UPDATE SKIP LOCKED").scalar()
            conn.rollback()
            top = plan[0]["Plan"]
            said.append(f"{name} {top['Shared Hit Blocks'] + top['Shared Read Blocks']:,} pages "
                        f"in {plan[0]['Execution Time']:.2f} ms")
    return "one claim's walk reads: " + "; ".join(said)


def fresh_store(url: str, prefix: str) -> Store:
    store = Store(url, Options(create_tables=True, table_prefix=prefix))
    store.t.metadata.drop_all(store.engine)
    store.create_all()
    return store


def summary(name: str, windows: list[dict], base: dict) -> str:
    rate = statistics.median(w["rate"] for w in windows)
    claim = statistics.median(w["median_ms"] for w in windows)
    worst = max(w["median_ms"] for w in windows)
    return (f"{name:6} median window {rate:7.0f} jobs/s ({base['rate'] / rate:.2f}x slower than fresh), claim loop "
            f"median {claim:.2f} ms ({claim / base['claim']:.2f}x), worst window {worst:.2f} ms "
            f"({worst / base['claim']:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url", nargs="?", help="a PostgreSQL SQLAlchemy URL (default: a private server)")
    ap.add_argument("--jobs", type=int, default=300_000, help="jobs per phase (fresh, held)")
    ap.add_argument("--after", type=int, default=100_000, help="jobs after the held transaction ends")
    ap.add_argument("--chunk", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--backlog", type=int, default=1000)
    ap.add_argument("--window", type=int, default=25_000)
    ap.add_argument("--prefix", default="soak_")
    ap.add_argument("--no-resume", action="store_true",
                    help="every claim walks the poll index from its start (as before store.claim_resume)")
    args = ap.parse_args()
    server = None
    url = args.url
    if url is None:
        from tests.support.postgres import PrivatePostgres
        server = PrivatePostgres(settings={"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"})
        url = server.start().url()
    try:
        print(f"fresh: {args.jobs:,} jobs, autovacuum free", flush=True)
        store = fresh_store(url, args.prefix)
        resume = None if args.no_resume else ResumePoint()
        fresh = flow(store, args.jobs, args.chunk, args.batch, args.backlog, args.window, "fresh", resume)
        print("  " + dead_tuples(store))
        print("  " + claim_pages(store, args.batch, resume))
        base = {"rate": statistics.median(w["rate"] for w in fresh),
                "claim": statistics.median(w["median_ms"] for w in fresh)}

        print(f"held: {args.jobs:,} jobs under a snapshot held open for the whole phase", flush=True)
        store = fresh_store(url, args.prefix)
        holder = create_engine(store.engine.url, poolclass=NullPool).connect()
        holder.exec_driver_sql("BEGIN ISOLATION LEVEL REPEATABLE READ")
        holder.exec_driver_sql(f"SELECT count(*) FROM {store.t.processes.name}").all()
        resume = None if args.no_resume else ResumePoint()
        held = flow(store, args.jobs, args.chunk, args.batch, args.backlog, args.window, "held", resume)
        print("  " + dead_tuples(store))
        print("  " + claim_pages(store, args.batch, resume) + " (the snapshot still held)")
        holder.exec_driver_sql("COMMIT")
        holder.close()

        print(f"after: {args.after:,} more jobs once the held transaction has ended (autovacuum only)", flush=True)
        after = flow(store, args.after, args.chunk, args.batch, args.backlog, args.window, "after", resume)
        print("  " + dead_tuples(store))
        print("  " + claim_pages(store, args.batch, resume))
        print()
        for name, windows in (("fresh", fresh), ("held", held), ("after", after)):
            print(summary(name, windows, base))
    finally:
        if server is not None:
            server.destroy()


if __name__ == "__main__":
    main()
