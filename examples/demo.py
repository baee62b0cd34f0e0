"""A tour of celery_sqlbackend on the embedded SQLite default, with a real worker.

    python examples/demo.py

1. the queue: jobs with priorities, a countdown and an error, run by a real
   ``celery worker`` (prefork), results read back from the same database;
2. the store: ``celery sqlq status`` shows queues and the worker's process row;
3. checkpoint: a resumable backfill is interrupted by a worker stop (SIGTERM),
   saves its place, and a second worker finishes it (``backfill.py``).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = Path(tempfile.mkdtemp(prefix="sqlq-demo-"))
os.environ["DEMO_DIR"] = str(DATA)
os.environ["BACKFILL_DIR"] = str(DATA / "backfill")
sys.path.insert(0, str(HERE))

from demo_app import add, app, divide, report  # noqa: E402


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def celery(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "celery", "-A", "demo_app", *args], cwd=HERE,
                            env=dict(os.environ), **kw)


def main() -> None:
    say(f"1. jobs go into {DATA}/jobs.sqlite3 before any worker runs")
    paused = [report.apply_async((f"priority {p}",), priority=p) for p in (0, 9, 5)]
    later = add.apply_async((40, 2), countdown=3)
    failing = divide.delay(1, 0)
    print("   queued: three jobs at priorities 0, 9, 5; add(40, 2) due in 3 s; divide(1, 0)")

    log = open(DATA / "worker.log", "w")
    worker = celery("worker", "-c", "1", "--loglevel=INFO", "--without-gossip", "--without-mingle",
                    "-n", "demo@%h", stdout=log, stderr=subprocess.STDOUT)
    print(f"   (the worker's log: {DATA}/worker.log)")
    try:
        say("2. a prefork worker drains them: higher priority first")
        ran = sorted((r.get(timeout=60) for r in paused), key=lambda lt: lt[1])
        print("   ran in this order:", ", ".join(label for label, _ in ran))
        print("   add(40, 2) ->", later.get(timeout=60), "(after its countdown, kept in the database meanwhile)")
        try:
            failing.get(timeout=60)
        except ZeroDivisionError as exc:
            print(f"   divide(1, 0) raised {exc.__class__.__name__}: {exc} (re-raised from the stored result)")

        say("3. `celery sqlq status`: queues and the registered worker process")
        subprocess.run([sys.executable, "-m", "celery", "-A", "demo_app", "sqlq", "status"], cwd=HERE,
                       env=dict(os.environ), check=True)
    finally:
        worker.terminate()
        worker.wait(60)
    print("   worker stopped (SIGTERM): it finished its jobs, then removed its process row")

    say("4. checkpoint: a resumable backfill, interrupted and resumed")
    import backfill
    backfill.demo()
    say(f"done; everything above lives in {DATA}")


if __name__ == "__main__":
    started = time.monotonic()
    main()
    print(f"(demo took {time.monotonic() - started:.0f} s)")
