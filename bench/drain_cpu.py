"""One worker's drain on MariaDB/MySQL, with the CPU each party spent per job: what bounds the drain.

    .venv/bin/python bench/drain_cpu.py --jobs 8000 --rounds 5 \\
        "before:/path/to/old/checkout" "after:." "after-mysqlclient:.:mysqldb"

Each target is ``name:tree[:driver]``: the code at ``tree`` (a checkout or a
``git worktree``, put first on ``PYTHONPATH``), with PyMySQL or mysqlclient
(``mysqldb``).  Per round and target: a fresh database, ``--jobs`` no-op jobs
queued with groups (fast, and outside the timing), then a real ``celery
worker -P prefork -c 2``; from its first completion to its last it reports
jobs/s and, read from ``/proc``, the CPU time per job of the worker's main
process, of its pool processes and of the database server (``--server-pid``,
default: the one ``mariadbd``), and the share of the machine's CPU left idle.
The targets take turns, ``--rounds`` times; the last lines give the medians.

Why: on a 2-core machine that runs the database too, a drain is bound either
by CPU (little idle) or by the worker waiting on the server while its pool
waits on it (much idle), and the remedies differ.  The machine's speed drifts
by a third within minutes here, so compare medians of alternating rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402

ENQUEUE = """
import json, time
from celery import group
from benchapp import app, noop
t = time.perf_counter()
for k in range(0, {n}, 1000):
    group(noop.s(i) for i in range(k, min({n}, k + 1000))).apply_async()
print(json.dumps({{"enqueued_in_s": round(time.perf_counter() - t, 2)}}))
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def machine_idle() -> tuple[int, int]:
    """(idle + iowait ticks, all ticks) of the whole machine so far."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return ticks[3] + ticks[4], sum(ticks)


def one_drain(name: str, tree: str, driver: str, args, work: Path) -> dict:
    url = bench.fresh_mysql_db(args.mysql_url, "bench_drain_cpu", driver=driver)
    marks = work / "marks"
    marks.unlink(missing_ok=True)
    env = bench._env(bench.Target(name, f"sqlq+{url}", options={"create_tables": True}), marks, args.prefetch)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(Path(tree).resolve())])
    bench._py(ENQUEUE.format(n=args.jobs), env)
    marks.unlink(missing_ok=True)
    worker = bench.Worker(env, work / f"{name}.log")
    try:
        deadline = time.monotonic() + 120
        while bench._count(marks) == 0:
            if worker.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name}: the worker completed nothing (see {work / (name + '.log')})")
            time.sleep(0.002)
        main = worker.proc.pid
        parts = {"main": lambda: cpu_seconds(main), "pool": lambda: sum(cpu_seconds(c) for c in children(main)),
                 "server": lambda: cpu_seconds(args.server_pid)}
        before = {k: f() for k, f in parts.items()}
        idle0, first, done0 = machine_idle(), time.perf_counter(), bench._count(marks)
        _, last = bench._wait_marks(marks, args.jobs, 600, worker)
        after = {k: f() for k, f in parts.items()}
        idle1 = machine_idle()
    finally:
        worker.stop()
    jobs = args.jobs - done0
    return {"rate": round(jobs / (last - first)), "idle": round((idle1[0] - idle0[0]) / (idle1[1] - idle0[1]), 2),
            **{f"{k}_ms": round((after[k] - before[k]) * 1000 / jobs, 3) for k in parts}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("targets", nargs="+", help="name:tree[:driver] (driver: pymysql, the default, or mysqldb)")
    ap.add_argument("--jobs", type=int, default=8000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prefetch", type=int, default=4, help="worker_prefetch_multiplier (Celery's default: 4)")
    ap.add_argument("--mysql-url", default=os.environ.get("SQLQ_TEST_MYSQL_URL"),
                    help="a server whose user may CREATE DATABASE (default: $SQLQ_TEST_MYSQL_URL)")
    ap.add_argument("--server-pid", type=int, help="the database server's process (default: the one mariadbd)")
    args = ap.parse_args()
    if not args.mysql_url:
        ap.error("no MariaDB/MySQL URL: pass --mysql-url or set SQLQ_TEST_MYSQL_URL")
    if args.server_pid is None:
        found = subprocess.run(["pgrep", "-x", "mariadbd"], capture_output=True, text=True).stdout.split()
        if len(found) != 1:
            ap.error(f"found {len(found)} mariadbd processes; name the server with --server-pid")
        args.server_pid = int(found[0])
    targets = [(t.split(":") + ["pymysql"])[:3] for t in args.targets]
    results: dict[str, list[dict]] = {name: [] for name, _, _ in targets}
    with tempfile.TemporaryDirectory(prefix="sqlq-drain-cpu-") as tmp:
        for round_ in range(1, args.rounds + 1):
            for name, tree, driver in targets:
                figures = one_drain(name, tree, driver, args, Path(tmp))
                results[name].append(figures)
                print(f"round {round_} {name}: {json.dumps(figures)}", flush=True)
    print(f"\nmedians of {args.rounds} rounds, {args.jobs} jobs, prefork -c 2, prefetch multiplier {args.prefetch}:")
    for name, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"  {name:24s} {med['rate']:6.0f} jobs/s (runs {', '.join(str(r['rate']) for r in runs)}); "
              f"idle {med['idle']:.2f}; CPU ms/job: main {med['main_ms']:.3f}, pool {med['pool_ms']:.3f}, "
              f"server {med['server_ms']:.3f}")


if __name__ == "__main__":
    main()
