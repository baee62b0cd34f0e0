"""A resumable CSV import on the sqlq broker (SQLite).

The job reads a CSV file 500 rows at a time and inserts each batch in one
transaction.  Its cursor is the byte offset after the last imported row, so a
run that is stopped — or killed — continues from the file position it had
reached instead of re-reading the file from the top.  The inserts are plain
INSERTs into a table with a primary key: a row imported twice would fail the job.

Run the whole story (write a CSV, enqueue, stop a worker mid-file, restart)::

    python examples/csv_import.py demo

Or by hand, from the ``examples`` directory::

    python csv_import.py enqueue path/to/people.csv
    celery -A csv_import worker

Data lives in ``$CSV_IMPORT_DIR`` (default: a directory under /tmp).
"""
from __future__ import annotations

import csv
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import celery_sqlbackend  # noqa: F401  (registers the sqlq+ transport)
from celery import Celery

from checkpoint import IterativeTask

DATA = Path(os.environ.get("CSV_IMPORT_DIR") or Path(tempfile.gettempdir()) / "checkpoint-csv-import")
DATA.mkdir(parents=True, exist_ok=True)
PEOPLE_DB = DATA / "people.sqlite3"

app = Celery("csv_import", broker=f"sqlq+sqlite:///{DATA}/jobs.sqlite3")
app.conf.update(broker_connection_retry_on_startup=True, task_ignore_result=True,
                worker_prefetch_multiplier=1, broker_transport_options={"polling_interval": 0.1})


def people_db() -> sqlite3.Connection:
    conn = sqlite3.connect(PEOPLE_DB, timeout=30)
    conn.execute("CREATE TABLE IF NOT EXISTS people (email TEXT PRIMARY KEY, name TEXT, city TEXT, note TEXT)")
    return conn


class ImportPeople(IterativeTask):
    """Import a CSV of people (header: email,name,city,note)."""

    name = "people.import_csv"
    checkpoint_every = 4   # durable cursor every 4 batches (2 000 rows)

    def build_enumerator(self, path, *, cursor=None):
        return self.enumerate.csv_batches(path, cursor=cursor, batch_size=500)

    def each_iteration(self, rows, path):
        with people_db() as conn:  # one transaction per batch
            conn.executemany("INSERT INTO people VALUES (:email, :name, :city, :note)", rows)
        time.sleep(0.05)  # pretend each batch is real work, so there is time to interrupt

    def on_start(self, path):
        print(f"csv_import: importing {path} ({os.path.getsize(path)} bytes)")

    def on_resume(self, path):
        p = self.progress
        print(f"csv_import: resumed at byte {p.cursor} ({p.iterations} batches done, "
              f"interrupted {p.times_interrupted}x)")

    def on_shutdown(self, path):
        print(f"csv_import: run ends at byte {self.progress.cursor}")

    def on_complete(self, path):
        p = self.progress
        print(f"csv_import: complete: {p.iterations} batches, {p.times_interrupted} interruption(s)")


import_people = app.register_task(ImportPeople())


def write_csv(path: Path, rows: int) -> None:
    rng = random.Random(7)
    cities = ["Lyon", "Ōsaka", "São Paulo", "Oslo, Norway", 'The "Big" Apple']
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["email", "name", "city", "note"])
        for i in range(rows):
            note = "line one\nline two" if i % 97 == 0 else ""  # quoted fields spanning lines
            writer.writerow([f"person{i}@example.com", f"Person {i}", rng.choice(cities), note])


def imported() -> int:
    if not PEOPLE_DB.exists():
        return 0
    with people_db() as conn:
        return conn.execute("SELECT count(*) FROM people").fetchone()[0]


# -- the demo ----------------------------------------------------------------------

COMPLETED = threading.Event()


def start_worker(number: int) -> subprocess.Popen:
    print(f"demo: starting worker {number}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "csv_import", "worker", "-c", "1", "-n", f"csv{number}@%h",
         "--loglevel", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat"],
        cwd=Path(__file__).resolve().parent, env={**os.environ, "CSV_IMPORT_DIR": str(DATA)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    threading.Thread(target=_echo, args=(proc, number), daemon=True).start()
    return proc


def _echo(proc: subprocess.Popen, number: int) -> None:
    for line in proc.stdout:
        if "csv_import: " in line:
            print(f"  worker {number} | {line.split('csv_import: ', 1)[1].strip()}")
            if "complete" in line:
                COMPLETED.set()
        elif "Error" in line or "Traceback" in line:
            print(f"  worker {number} ! {line.rstrip()}")


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("demo: timed out")
        time.sleep(0.05)


def demo(rows: int = 20_000) -> None:
    for old in DATA.glob("*.sqlite3*"):
        old.unlink()
    path = DATA / "people.csv"
    write_csv(path, rows)
    result = import_people.delay(str(path))
    print(f"demo: wrote {rows} rows to {path}; enqueued job {result.id}")
    worker = start_worker(1)
    wait_for(lambda: imported() >= rows // 3)
    print(f"demo: {imported()} rows imported; asking worker 1 to stop (SIGTERM)")
    worker.terminate()
    worker.wait(60)
    print(f"demo: worker 1 exited with {imported()} rows imported")
    worker = start_worker(2)
    wait_for(COMPLETED.is_set)
    worker.terminate()
    worker.wait(60)
    assert imported() == rows, imported()
    print(f"demo: all {rows} rows imported, none twice")


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "demo"
    if command == "demo":
        demo()
    elif command == "enqueue":
        print(import_people.delay(os.path.abspath(sys.argv[2])).id)
    else:
        raise SystemExit(f"usage: {sys.argv[0]} [demo | enqueue PATH]")
