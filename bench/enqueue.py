"""Enqueue rates: single messages, and a 10,000-task group side by side with Redis, in one run.

    .venv/bin/python bench/enqueue.py                    # sqlq+sqlite, sqlq+postgresql, redis
    .venv/bin/python bench/enqueue.py --singles 3000 --group 10000 --repeat 3
    .venv/bin/python bench/enqueue.py --baseline /path/to/a/checkout/of/main   # "before" beside "after"

No worker runs: this measures the producer only (what ``apply_async`` costs the
application).  Each target is measured in a fresh ``python`` process, the
targets taking turns ``--repeat`` times; the report shows the median and every
run.  PostgreSQL is a private server with durable settings (fsync and
``synchronous_commit`` on), as in ``bench.py``, unless ``--pg-url`` says
otherwise; Redis is ``--redis-url`` (default: the shared dev server).

* **single/s**: sequential ``noop.apply_async((i,))`` on one producer.
* **group/s**: ``group(noop.s(i) for i in range(N)).apply_async()``, tasks per second.
* **enqueue_many/s** (sqlq only): ``celery_sqlbackend.enqueue_many`` of the same N signatures.

``--baseline DIR`` adds ``sqlq+… (before)`` targets that import ``celery_sqlbackend``
from another checkout (e.g. a ``git worktree`` of the commit before a change), so
that before and after are measured in the same minutes, taking turns.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable

MEASURE = """
import json, time, uuid
import celery_sqlbackend
from celery import Celery, group
app = Celery("enqbench", broker={broker!r})
app.conf.update(task_ignore_result=True, broker_transport_options={{"create_tables": True}},
                task_default_queue={queue!r})

@app.task(name="bench.noop")
def noop(i):
    return None

out = {{}}
with app.producer_or_acquire() as p:
    noop.apply_async((0,), producer=p)          # connect and create tables outside the timing
    t = time.perf_counter()
    for i in range({singles}):
        noop.apply_async((i,), producer=p)
    out["single_per_s"] = {singles} / (time.perf_counter() - t)
    g = group(noop.s(i) for i in range({group}))
    t = time.perf_counter()
    g.apply_async(producer=p)
    out["group_per_s"] = {group} / (time.perf_counter() - t)
if {many} and hasattr(celery_sqlbackend, "enqueue_many"):
    sigs = [noop.s(i) for i in range({group})]
    t = time.perf_counter()
    celery_sqlbackend.enqueue_many(sigs, app=app)
    out["enqueue_many_per_s"] = {group} / (time.perf_counter() - t)
out["code"] = celery_sqlbackend.__file__
print(json.dumps(out))
"""


def measure(broker: str, queue: str, args, many: bool, code_root: Path = ROOT) -> dict:
    code = MEASURE.format(broker=broker, queue=queue, singles=args.singles, group=args.group, many=many)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(code_root), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([PY, "-c", code], env=env, cwd=HERE, capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise RuntimeError(f"{broker.split(':')[0]}: {out.stderr[-3000:]}")
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    where = Path(figures.pop("code")).resolve()
    if not where.is_relative_to(code_root.resolve()):
        raise RuntimeError(f"measured {where}, not the code in {code_root}")
    return figures


def clear_redis(url: str, queue: str) -> None:
    import redis
    redis.Redis.from_url(url).delete(queue)


def pg_base_url(pg_url: str | None) -> str | None:
    if pg_url:
        return pg_url
    sys.path.insert(0, str(ROOT))
    from tests.harness import PrivatePostgres
    server = PrivatePostgres(settings={"fsync": "on", "full_page_writes": "on", "synchronous_commit": "on"})
    return server.start().url()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--singles", type=int, default=3000)
    ap.add_argument("--group", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--pg-url", default=None, help="a server URL (default: a private durable server)")
    ap.add_argument("--redis-url", default=os.environ.get("SQLQ_TEST_REDIS_URL", "redis://127.0.0.1:56379/0"))
    ap.add_argument("--only", default="", help="comma-separated target names")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="a checkout of the code to compare with (its sqlq targets run as '… (before)')")
    args = ap.parse_args()

    sys.path.insert(0, str(HERE))
    from bench import fresh_pg_db, _remove_sqlite

    work = Path(tempfile.mkdtemp(prefix="sqlq-enqbench-"))
    queue = f"enqbench{os.getpid()}"
    pg = pg_base_url(args.pg_url)
    sqlite = lambda: (_remove_sqlite(work / "e.sqlite3"), f"sqlq+sqlite:///{work}/e.sqlite3")[1]  # noqa: E731
    postgres = lambda: f"sqlq+{fresh_pg_db(pg, 'bench_enqueue')}"  # noqa: E731
    targets = {"sqlq+sqlite": (sqlite, True, ROOT), "sqlq+postgresql": (postgres, True, ROOT)}
    if args.baseline:
        targets.update({"sqlq+sqlite (before)": (sqlite, False, args.baseline),
                        "sqlq+postgresql (before)": (postgres, False, args.baseline)})
    targets["redis"] = (lambda: (clear_redis(args.redis_url, queue), args.redis_url)[1], False, ROOT)
    if args.only:
        targets = {k: v for k, v in targets.items() if k in args.only.split(",")}
    runs: dict[str, list[dict]] = {name: [] for name in targets}
    for run in range(args.repeat):
        for name, (fresh, many, code_root) in targets.items():
            figures = measure(fresh(), queue, args, many, code_root)
            runs[name].append(figures)
            print(f"--- run {run + 1}/{args.repeat} {name}: " +
                  ", ".join(f"{k} {v:,.0f}" for k, v in figures.items()), flush=True)
    if "redis" in targets:
        clear_redis(args.redis_url, queue)

    medians = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    print(f"\nmedians of {args.repeat} ({args.singles} single messages; a group of {args.group:,}):")
    for name, m in medians.items():
        print(f"  {name:16s} " + "  ".join(f"{k} {v:>10,.0f}" for k, v in m.items()))
    redis_group = medians.get("redis", {}).get("group_per_s")
    if redis_group:
        for name, m in medians.items():
            if name != "redis":
                print(f"  group rate {name}/redis: {m['group_per_s'] / redis_group:.1f}x")
    for db in ("sqlite", "postgresql"):
        after, before = medians.get(f"sqlq+{db}"), medians.get(f"sqlq+{db} (before)")
        if after and before:
            print(f"  single rate sqlq+{db} after/before: {after['single_per_s'] / before['single_per_s']:.2f}x, "
                  f"group {after['group_per_s'] / before['group_per_s']:.1f}x")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "enqueue.json").write_text(json.dumps({"runs": runs, "medians": medians, "singles": args.singles,
                                                  "group": args.group}, indent=2))


if __name__ == "__main__":
    main()
