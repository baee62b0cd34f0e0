"""Throughput and latency of celery_sqlbackend, side by side with its alternatives.

    .venv/bin/python bench/bench.py                 # everything available on this machine
    .venv/bin/python bench/bench.py --jobs 500 --quick

Every target runs the same Celery app (``benchapp.py``) with a real
``celery worker`` (prefork, 2 processes) on the same machine, one after the
other:

* ``sqlq+sqlite``, ``sqlq+postgresql``: this project;
* ``sqla+sqlite``, ``sqla+postgresql``: kombu's own SQLAlchemy transport;
* ``redis``: when a ``redis-server`` binary is on PATH (started privately);
* ``sqlq+mysql`` (PyMySQL; and ``sqlq+mysql(mysqlclient)`` when it is installed), ``sqla+mysql``:
  on the MariaDB/MySQL server of ``--mysql-url`` / ``SQLQ_TEST_MYSQL_URL``, when given.

``--two-workers`` also drains numbered jobs with two workers at once and counts
duplicates and losses; ``--compare-loops`` adds MariaDB with Celery's blocking loop.

PostgreSQL comes from ``--pg-url`` / ``SQLQ_TEST_PG_URL``, or a private
server is started with ``initdb``/``pg_ctl`` as the test suite does.

Figures: enqueue rate (one producer, sequential ``apply_async``), drain rate
(jobs enqueued first; measured from the first to the last completion, so
worker start-up is excluded; ``--repeat`` runs per target, the targets taking
turns, and the median is shown), enqueue-to-start latency (p50/p99 over idle
single jobs), results stored and collected (``ResultSet.get`` of N results,
and a group of 1,000) against Celery's ``db+`` backend and Redis, and the cost
of one claim with 1,000 versus 1,000,000 jobs waiting.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable


@dataclass
class Target:
    name: str
    broker: str
    backend: str | None = None          # result backend for the results run
    backend_name: str = ""
    options: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)
    reset: Callable[[], None] | None = None   # empties the database between drain runs


# --------------------------------------------------------------------------- helpers

def _env(target: Target, marks: Path, prefetch_multiplier: int, with_backend: bool = False) -> dict:
    env = dict(os.environ)
    env.update(BENCH_BROKER=target.broker, BENCH_MARKS=str(marks), BENCH_PREFETCH=str(prefetch_multiplier),
               BENCH_TRANSPORT_OPTIONS=repr(target.options),
               PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT)]))
    env["BENCH_BACKEND"] = (target.backend or "") if with_backend else ""
    return env


def _py(code: str, env: dict, timeout: float = 600) -> dict:
    out = subprocess.run([PY, "-c", code], env=env, cwd=HERE, capture_output=True, text=True, timeout=timeout)
    if out.returncode:
        raise RuntimeError(f"bench step failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _count(marks: Path) -> int:
    try:
        with open(marks, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def concurrency() -> str:
    """The pool size of every worker (``--concurrency``; 2, this machine's cores, by default)."""
    return os.environ.get("BENCH_CONCURRENCY", "2")


class Worker:
    def __init__(self, env: dict, log: Path):
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [PY, "-m", "celery", "-A", "benchapp", "worker", "-P", "prefork", "-c", concurrency(), f"--loglevel={os.environ.get('BENCH_LOGLEVEL', 'WARNING')}",
             "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", f"bench{os.getpid()}@%h"],
            env=env, cwd=HERE, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self.log.close()


def _wait_marks(marks: Path, n: int, timeout: float, worker: Worker) -> tuple[float, float]:
    """Wait for ``n`` completions; return (time of first, time of last)."""
    first = None
    deadline = time.monotonic() + timeout
    while True:
        c = _count(marks)
        now = time.perf_counter()
        if c and first is None:
            first = now
        if c >= n:
            return first, now
        if time.monotonic() > deadline or worker.proc.poll() is not None:
            raise RuntimeError(f"only {c}/{n} jobs completed (worker exit code {worker.proc.poll()})")
        time.sleep(0.005)


ENQUEUE = """
import json, time
from benchapp import app, noop
n = {n}
with app.producer_or_acquire() as p:
    noop.apply_async((0,), producer=p)   # connect + create tables outside the timing
    t = time.perf_counter()
    for i in range(n - 1):
        noop.apply_async((i,), producer=p)
    dt = time.perf_counter() - t
print(json.dumps({{"enqueue_per_s": (n - 1) / dt}}))
"""

LATENCY = """
import json, time, os
from benchapp import app, latency
marks = os.environ["BENCH_MARKS"]
def count():
    try:
        return open(marks, "rb").read().count(b"\\n")
    except FileNotFoundError:
        return 0
calls = []
with app.producer_or_acquire() as p:
    for i in range({n} + 1):
        before = count()
        t = time.time()
        latency.apply_async((t,), producer=p)
        calls.append(time.time() - t)
        deadline = time.monotonic() + 30
        while count() == before and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(0.02)
calls = sorted(calls[1:])
# The part of the latency spent in apply_async itself (the producer's transaction and commit).
print(json.dumps({{"latency_enqueue_p50_ms": calls[len(calls) // 2] * 1000}}))
"""

RESULTS = """
import json, time
from celery import group
from celery.result import ResultSet
from benchapp import app, echo
n = {n}
echo.delay(-1).get(timeout=60)   # warm: worker up, tables created
t = time.perf_counter()
rs = ResultSet([echo.delay(i) for i in range(n)])
values = rs.get(timeout=300)
dt = time.perf_counter() - t
assert sorted(values) == list(range(n))
from celery.result import AsyncResult, GroupResult
g = group(echo.s(i) for i in range(1000)).apply_async()
t2 = time.perf_counter()
assert len(g.get(timeout=300)) == 1000
total = time.perf_counter() - t2
# all stored now: time collecting them with fresh result objects (no cached state)
fresh = GroupResult(g.id, [AsyncResult(r.id, app=app) for r in g.results], app=app)
t3 = time.perf_counter()
assert len(fresh.get(timeout=300)) == 1000
collect = time.perf_counter() - t3
print(json.dumps({{"results_per_s": n / dt, "group1000_collect_s": collect, "group1000_total_s": total}}))
"""


# --------------------------------------------------------------------------- runs

def fresh_database(target: Target) -> None:
    """Empty the target's database before a drain run (every run starts from the same state)."""
    if target.reset is not None:
        target.reset()


def drain_once(target: Target, args, work: Path) -> float:
    """Enqueue ``--jobs`` jobs, start a worker, and time the drain; returns jobs/s."""
    marks = work / f"{target.name}.marks"
    env = _env(target, marks, args.prefetch_multiplier)
    fresh_database(target)
    target.figures.setdefault("enqueue_runs", []).append(_py(ENQUEUE.format(n=args.jobs), env)["enqueue_per_s"])
    marks.unlink(missing_ok=True)
    worker = Worker(env, work / f"{target.name}.drain.log")
    try:
        first, last = _wait_marks(marks, args.jobs, 600, worker)
    finally:
        worker.stop()
    return (args.jobs - 1) / (last - first) if last > first else float("nan")


def round_ratios(ours: list[float], theirs: list[float]) -> list[float]:
    """Our drain over theirs in each round (the two ran minutes apart at most).

    Why: this machine's speed drifts by as much as 2x within minutes, moving
    both targets of a round together; the ratio of each round's pair, and the
    median of those, is steadier than the ratio of the two medians.
    """
    return [a / b for a, b in zip(ours, theirs) if b > 0]


def run_drains(targets: list[Target], args, work: Path) -> None:
    """``--repeat`` drain runs per target, the targets taking turns.

    Why: on a shared machine the speed drifts by a quarter or more within
    minutes, and a short drain (ours take seconds) samples one moment of it.
    Taking turns spreads every target over the same stretch of time, and the
    median of the runs is what the table shows (every run is kept in the JSON).
    """
    for run in range(args.repeat):
        for target in targets:
            rate = drain_once(target, args, work)
            target.figures.setdefault("drain_runs", []).append(rate)
            print(f"--- {target.name} drain run {run + 1}/{args.repeat}: {rate:.0f} jobs/s", flush=True)
    for target in targets:
        target.figures["drain_per_s"] = statistics.median(target.figures["drain_runs"])
        target.figures["enqueue_per_s"] = statistics.median(target.figures.pop("enqueue_runs"))


ENQUEUE_ONCE = """
import json
from benchapp import app, once
with app.producer_or_acquire() as p:
    for i in range({n}):
        once.apply_async((i,), producer=p)
print(json.dumps({{}}))
"""


def two_workers(target: Target, args, work: Path) -> None:
    """``--jobs`` numbered jobs drained by two workers at once: duplicates, losses and the rate.

    Every job writes its number; once the count stops growing for a second
    after the last expected line, the numbers are compared with the jobs sent.
    """
    marks = work / f"{target.name}.two.marks"
    env = _env(target, marks, args.prefetch_multiplier)
    fresh_database(target)
    marks.unlink(missing_ok=True)
    _py(ENQUEUE_ONCE.format(n=args.jobs), env)
    workers = [Worker(env, work / f"{target.name}.two{i}.log") for i in range(2)]
    try:
        first, last = _wait_marks(marks, args.jobs, 600, workers[0])
        settled, seen = time.monotonic(), _count(marks)
        while time.monotonic() - settled < 1.0:      # a late duplicate would still show up here
            time.sleep(0.05)
            if _count(marks) != seen:
                settled, seen = time.monotonic(), _count(marks)
    finally:
        for worker in workers:
            worker.stop()
    numbers = [int(x) for x in marks.read_text().split()]
    target.figures["two_workers_per_s"] = (args.jobs - 1) / (last - first) if last > first else float("nan")
    target.figures["two_workers_duplicates"] = len(numbers) - len(set(numbers))
    target.figures["two_workers_lost"] = len(set(range(args.jobs)) - set(numbers))


def run_target(target: Target, args, work: Path) -> None:
    """Latency (an idle worker) and the results run, after the drains."""
    marks = work / f"{target.name}.marks"
    print(f"--- {target.name}", flush=True)
    env = _env(target, marks, args.prefetch_multiplier)
    fresh_database(target)
    marks.unlink(missing_ok=True)
    worker = Worker(env, work / f"{target.name}.latency.log")
    try:
        target.figures.update(_py(LATENCY.format(n=args.latency_samples), env))
        lat = sorted(float(x) * 1000 for x in marks.read_text().split()[1:])  # first one warms up
        target.figures["latency_p50_ms"] = statistics.median(lat)
        target.figures["latency_p99_ms"] = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    finally:
        worker.stop()

    if args.two_workers:
        two_workers(target, args, work)

    if target.backend and not args.quick:
        env = _env(target, marks, args.prefetch_multiplier, with_backend=True)
        worker = Worker(env, work / f"{target.name}.results.log")
        try:
            target.figures.update(_py(RESULTS.format(n=args.jobs), env, timeout=900))
        finally:
            worker.stop()
    print("   ", {k: (round(v, 2) if isinstance(v, float) else v if isinstance(v, int) else [round(x) for x in v])
                  for k, v in target.figures.items()}, flush=True)


def claim_cost(db_url: str, sizes: list[int]) -> dict:
    """Median cost of claiming 10 jobs (and releasing them) with ``size`` jobs waiting."""
    code = f"""
import json, time, statistics
from sqlalchemy import text
from celery_sqlbackend.store import Store, utcnow
from celery_sqlbackend.options import Options
from celery_sqlbackend.processes import LocalProcess
store = Store({db_url!r}, Options(create_tables=True))
store.create_all()
t = store.t
out = {{}}
pid = store.processes.register(kind="bench", name="bench", hostname="h", pid=1, pool=None,
              concurrency=None, queues="[]", now=utcnow())
have = 0
for size in {sizes!r}:
    add = size - have
    dialect = store.dialect.name
    with store.engine.begin() as c:
        if dialect == "postgresql":
            c.execute(text(f"INSERT INTO {{t.jobs.name}} (queue_name, priority, payload, created_at, deliveries, releases) "
                           "SELECT 'bench', (g % 10), '{{}}', now(), 0, 0 FROM generate_series(1, :n) g"), {{"n": add}})
        else:
            c.execute(text(f"WITH RECURSIVE g(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM g WHERE x < :n) "
                           f"INSERT INTO {{t.jobs.name}} (queue_name, priority, payload, created_at, deliveries, releases) "
                           "SELECT 'bench', (x % 10), '{{}}', CURRENT_TIMESTAMP, 0, 0 FROM g"), {{"n": add}})
        c.execute(text(f"INSERT INTO {{t.ready.name}} (job_id, queue_name, priority, created_at) "
                       f"SELECT id, queue_name, priority, created_at FROM {{t.jobs.name}} j WHERE NOT EXISTS "
                       f"(SELECT 1 FROM {{t.ready.name}} r WHERE r.job_id = j.id)"))
    if dialect == "postgresql":
        with store.engine.connect() as c:
            c.execution_options(isolation_level="AUTOCOMMIT").execute(text(f"VACUUM ANALYZE {{t.ready.name}}"))
    have = size
    timings = []
    for _ in range(200):
        s = time.perf_counter()
        got = store.claims.claim(queues=["bench"], limit=10, process_id=pid, now=utcnow())
        timings.append(time.perf_counter() - s)
        for job in got:
            store.claims.release(job_id=job.job_id, process_id=pid, now=utcnow())
    out[size] = statistics.median(timings) * 1000
print(json.dumps(out))
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return _py(code, env, timeout=1800)


# --------------------------------------------------------------------------- servers

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(work: Path):
    exe = shutil.which("redis-server")
    if not exe:
        return None, None
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    return None, None


def pg_base_url(args) -> str | None:
    url = args.pg_url or os.environ.get("SQLQ_TEST_PG_URL")
    if url:
        return url
    sys.path.insert(0, str(ROOT))
    try:
        from tests.harness import PrivatePostgres  # the test suite's throwaway server
    except ImportError:
        return None
    try:
        # Durable settings (the test suite turns fsync off for speed).
        server = PrivatePostgres(settings={"fsync": "on", "full_page_writes": "on", "synchronous_commit": "on"})
        return server.start().url()
    except Exception as exc:
        print(f"!!! no PostgreSQL for the benchmark: {exc}", flush=True)
        return None


def _remove_sqlite(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def fresh_pg_db(base_url: str, name: str) -> str:
    import psycopg
    from sqlalchemy.engine import make_url
    u = make_url(base_url)
    admin = u.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}"')
        c.execute(f'CREATE DATABASE "{name}"')
    return u.set(database=name).render_as_string(hide_password=False)


def _has_module(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def fresh_mysql_db(base_url: str, name: str, driver: str = "pymysql") -> str:
    """A new, empty database ``name`` on the MariaDB/MySQL server of ``base_url``; its URL with ``driver``."""
    import pymysql
    from sqlalchemy.engine import make_url
    u = make_url(base_url)
    conn = pymysql.connect(host=u.host, port=u.port or 3306, user=u.username, password=u.password or "")
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
            cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    finally:
        conn.close()
    return u.set(drivername=f"mysql+{driver}", database=name).render_as_string(hide_password=False)


# --------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--latency-samples", type=int, default=200)
    ap.add_argument("--claim-scale", type=int, default=1_000_000)
    ap.add_argument("--pg-url", default=None)
    ap.add_argument("--mysql-url", default=None,
                    help="a MariaDB/MySQL server whose user may CREATE DATABASE (default: $SQLQ_TEST_MYSQL_URL)")
    ap.add_argument("--compare-loops", action="store_true",
                    help="MariaDB also with Celery's blocking loop (event_loop=False) beside the default")
    ap.add_argument("--two-workers", action="store_true",
                    help="also drain --jobs numbered jobs with two workers at once (duplicates, losses)")
    ap.add_argument("--quick", action="store_true", help="skip the results run and the claim-scale run")
    ap.add_argument("--only", default="", help="comma-separated target names")
    ap.add_argument("--no-claims", action="store_true", help="skip the claim-scale run")
    ap.add_argument("--repeat", type=int, default=3,
                    help="drain runs per target, the targets taking turns; the table shows the median")
    ap.add_argument("--concurrency", type=int, default=2,
                    help="prefork pool size of every worker (default 2: Celery's default on a 2-core machine)")
    ap.add_argument("--prefetch-multiplier", type=int, default=4,
                    help="worker_prefetch_multiplier for every target (Celery's default: 4)")
    args = ap.parse_args()
    os.environ["BENCH_CONCURRENCY"] = str(args.concurrency)   # (read by every Worker)

    work = Path(tempfile.mkdtemp(prefix="sqlq-bench-"))
    redis_proc, redis_url = start_redis(work)
    pg = pg_base_url(args)
    # kombu's sqla+ hands every transport option to create_engine(), so it
    # runs with its defaults (1 s polling); ours runs with its own defaults.
    opts: dict = {}
    sqlq_opts = {"create_tables": True}
    targets: list[Target] = []
    sq = f"sqlite:///{work}/sqlq.sqlite3"
    # The default: woken at commit through the wake sockets beside the file (``sqlite_wake``); side by
    # side, the same worker woken by its poll alone, and woken in Celery's blocking loop.
    targets.append(Target("sqlq+sqlite", f"sqlq+{sq}", f"sqlq+{sq}", "sqlq", sqlq_opts,
                          reset=lambda: _remove_sqlite(work / "sqlq.sqlite3")))
    targets.append(Target("sqlq+sqlite(poll only)", f"sqlq+{sq}", f"sqlq+{sq}", "sqlq",
                          {**sqlq_opts, "sqlite_wake": False}, reset=lambda: _remove_sqlite(work / "sqlq.sqlite3")))
    targets.append(Target("sqlq+sqlite(wake, blocking loop)", f"sqlq+{sq}", f"sqlq+{sq}", "sqlq",
                          {**sqlq_opts, "event_loop": False},
                          reset=lambda: _remove_sqlite(work / "sqlq.sqlite3")))
    sa = f"sqlite:///{work}/sqla.sqlite3"
    targets.append(Target("sqla+sqlite", f"sqla+{sa}", f"db+sqlite:///{work}/sqla-results.sqlite3", "db+", opts,
                          reset=lambda: _remove_sqlite(work / "sqla.sqlite3")))
    if pg:
        a, b = fresh_pg_db(pg, "bench_sqlq"), fresh_pg_db(pg, "bench_sqla")
        targets.append(Target("sqlq+postgresql", f"sqlq+{a}", f"sqlq+{a}", "sqlq", sqlq_opts,
                              reset=lambda: fresh_pg_db(pg, "bench_sqlq")))
        targets.append(Target("sqla+postgresql", f"sqla+{b}", f"db+{b}", "db+", opts,
                              reset=lambda: fresh_pg_db(pg, "bench_sqla")))
    else:
        print("!!! PostgreSQL not available: PostgreSQL rows are missing from this run", flush=True)
    my = args.mysql_url or os.environ.get("SQLQ_TEST_MYSQL_URL")
    if my:
        # PyMySQL (pure Python) for ours and kombu's alike, and ours again on mysqlclient (C).
        a, b = fresh_mysql_db(my, "bench_sqlq"), fresh_mysql_db(my, "bench_sqla")
        targets.append(Target("sqlq+mysql", f"sqlq+{a}", f"sqlq+{a}", "sqlq", sqlq_opts,
                              reset=lambda: fresh_mysql_db(my, "bench_sqlq")))
        if _has_module("MySQLdb"):
            c = fresh_mysql_db(my, "bench_sqlq_c", driver="mysqldb")
            targets.append(Target("sqlq+mysql(mysqlclient)", f"sqlq+{c}", f"sqlq+{c}", "sqlq", sqlq_opts,
                                  reset=lambda: fresh_mysql_db(my, "bench_sqlq_c", driver="mysqldb")))
        if args.compare_loops:
            targets.append(Target("sqlq+mysql(blocking loop)", f"sqlq+{a}", f"sqlq+{a}", "sqlq",
                                  {**sqlq_opts, "event_loop": False}, reset=lambda: fresh_mysql_db(my, "bench_sqlq")))
        targets.append(Target("sqla+mysql", f"sqla+{b}", f"db+{b}", "db+", opts,
                              reset=lambda: fresh_mysql_db(my, "bench_sqla")))
    else:
        print("!!! no MariaDB/MySQL URL (--mysql-url, SQLQ_TEST_MYSQL_URL): MariaDB rows are missing", flush=True)
    if redis_url:
        targets.append(Target("redis", redis_url, redis_url.rsplit("/", 1)[0] + "/1", "redis"))
    else:
        print("!!! redis-server not found: no Redis row in this run", flush=True)
    if args.only:
        wanted = set(args.only.split(","))
        targets = [t for t in targets if t.name in wanted]

    try:
        run_drains(targets, args, work)
        for target in targets:
            run_target(target, args, work)
        claims = {}
        if not args.quick and not args.no_claims:
            claims["sqlite"] = claim_cost(f"sqlite:///{work}/claims.sqlite3", [1000, args.claim_scale])
            if pg:
                claims["postgresql"] = claim_cost(fresh_pg_db(pg, "bench_claims"), [1000, args.claim_scale])
    finally:
        if redis_proc:
            redis_proc.kill()
    report(targets, claims, args)


def report(targets: list[Target], claims: dict, args) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"celery_sqlbackend benchmark: {args.jobs} jobs, prefork -c {args.concurrency}, "
                          f"prefetch multiplier {args.prefetch_multiplier}, one machine")
    cols = [("enqueue_per_s", "enqueue/s"), ("drain_per_s", "drain/s"), ("two_workers_per_s", "2 workers/s"),
            ("two_workers_duplicates", "dup"), ("two_workers_lost", "lost"), ("latency_p50_ms", "p50 ms"),
            ("latency_p99_ms", "p99 ms"), ("results_per_s", "results/s"), ("group1000_collect_s", "group(1000) get s")]
    table.add_column("target")
    for _, title in cols:
        table.add_column(title, justify="right")
    for t in targets:
        table.add_row(t.name + (f" / {t.backend_name}" if t.backend_name else ""),
                      *[f"{t.figures[k]:.1f}" if k in t.figures else "-" for k, _ in cols])
    console = Console()
    console.print(table)
    for t in targets:
        runs = t.figures.get("drain_runs", [])
        console.print(f"drain runs {t.name}: " + " / ".join(f"{r:,.0f}" for r in runs) + " jobs/s (median in the table)")
    by = {t.name: t.figures for t in targets}
    for db in ("sqlite", "postgresql", "mysql"):
        ours, theirs = by.get(f"sqlq+{db}"), by.get(f"sqla+{db}")
        if ours and theirs:
            console.print(f"drain rate sqlq/sqla on {db}: {ours['drain_per_s'] / theirs['drain_per_s']:.1f}x")
            paired = round_ratios(ours.get("drain_runs", []), theirs.get("drain_runs", []))
            if len(paired) > 1:
                console.print("  round by round: " + ", ".join(f"{r:.1f}" for r in paired)
                              + f"; median {statistics.median(paired):.1f}x")
            if "results_per_s" in ours and "results_per_s" in theirs:
                console.print(f"results rate sqlq/db+ on {db}: {ours['results_per_s'] / theirs['results_per_s']:.1f}x")
        if ours and "redis" in by:
            console.print(f"drain rate sqlq+{db}/redis: {ours['drain_per_s'] / by['redis']['drain_per_s']:.0%}")
    for db, c in claims.items():
        small, big = (c[k] for k in sorted(c, key=int))
        console.print(f"claim of 10 on {db}: {small:.2f} ms with 1,000 waiting, {big:.2f} ms with "
                      f"{args.claim_scale:,} waiting ({big / small:.2f}x)")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps({"targets": {t.name: t.figures for t in targets},
                                                 "claims_ms": claims, "jobs": args.jobs}, indent=2))


if __name__ == "__main__":
    main()
