"""A resumable backfill over a SQLAlchemy table, on the sqlq broker (SQLite).

The job fills ``orders.total_with_tax`` for one account, 200 orders per
iteration, paginating by primary key.  Stop the worker half-way and the job
re-enqueues itself with its cursor; the next worker carries on from there.

Run the whole story (seed, enqueue, stop a worker mid-job, restart, finish)::

    python examples/backfill.py demo

Or drive it by hand, from the ``examples`` directory::

    python backfill.py seed && python backfill.py enqueue
    celery -A backfill worker            # Ctrl-C it mid-way, start it again

Data lives in ``$BACKFILL_DIR`` (default: a directory under /tmp).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import celery_sqlbackend  # noqa: F401  (registers the sqlq+ transport)
import sqlalchemy as sa
from celery import Celery
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from checkpoint import IterativeTask

DATA = Path(os.environ.get("BACKFILL_DIR") or Path(tempfile.gettempdir()) / "checkpoint-backfill")
DATA.mkdir(parents=True, exist_ok=True)
SHOP_URL = f"sqlite:///{DATA}/shop.sqlite3"
ACCOUNT, ORDERS = 42, 6_000

app = Celery("backfill", broker=f"sqlq+sqlite:///{DATA}/jobs.sqlite3")
app.conf.update(broker_connection_retry_on_startup=True, task_ignore_result=True,
                worker_prefetch_multiplier=1, broker_transport_options={"polling_interval": 0.1})

engine = sa.create_engine(SHOP_URL, connect_args={"timeout": 30})


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    account_id: Mapped[int] = mapped_column(index=True)
    total: Mapped[int]
    total_with_tax: Mapped[int | None]


SET_TAX = (sa.update(Order.__table__).where(Order.__table__.c.id == sa.bindparam("b_id"))
           .values(total_with_tax=sa.bindparam("b_total")))


class BackfillTax(IterativeTask):
    """Compute ``total_with_tax`` for every order of an account."""

    name = "shop.backfill_tax"
    checkpoint_every = 5          # durable cursor every 5 batches (1 000 orders)

    def build_enumerator(self, account_id, rate, *, cursor=None):
        orders = sa.select(Order).where(Order.account_id == account_id)
        return self.enumerate.sqlalchemy_batches(orders, bind=engine, cursor=cursor, batch_size=200)

    def each_iteration(self, orders, account_id, rate):
        with engine.begin() as conn:
            conn.execute(SET_TAX, [{"b_id": o.id, "b_total": round(o.total * (1 + rate))} for o in orders])
        time.sleep(0.1)  # pretend each batch is real work, so there is time to interrupt

    def on_start(self, account_id, rate):
        print(f"backfill: started account {account_id}")

    def on_resume(self, account_id, rate):
        p = self.progress
        print(f"backfill: resumed after order {p.cursor[0]} ({p.iterations} batches done, "
              f"interrupted {p.times_interrupted}x)")

    def on_shutdown(self, account_id, rate):
        print(f"backfill: run ends at order {self.progress.cursor and self.progress.cursor[0]}")

    def on_complete(self, account_id, rate):
        p = self.progress
        print(f"backfill: complete: {p.iterations} batches, {p.times_interrupted} interruption(s), "
              f"{p.total_time:.1f}s iterating")


backfill_tax = app.register_task(BackfillTax())


def seed() -> None:
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(Order.__table__), [
            {"id": i, "account_id": ACCOUNT if i % 4 else 7, "total": 100 + i % 900, "total_with_tax": None}
            for i in range(1, ORDERS + 1)
        ])


def remaining() -> int:
    with engine.connect() as conn:
        return conn.scalar(sa.select(sa.func.count()).where(Order.account_id == ACCOUNT,
                                                            Order.total_with_tax.is_(None)))


# -- the demo ----------------------------------------------------------------------

def start_worker(number: int) -> subprocess.Popen:
    print(f"demo: starting worker {number}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "backfill", "worker", "-c", "1", "-n", f"backfill{number}@%h",
         "--loglevel", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat"],
        cwd=Path(__file__).resolve().parent, env={**os.environ, "BACKFILL_DIR": str(DATA)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    threading.Thread(target=_echo, args=(proc, number), daemon=True).start()
    return proc


COMPLETED = threading.Event()


def _echo(proc: subprocess.Popen, number: int) -> None:
    for line in proc.stdout:
        if "backfill: " in line:
            print(f"  worker {number} | {line.split('backfill: ', 1)[1].strip()}")
            if "complete" in line:
                COMPLETED.set()


def wait_for(predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("demo: timed out")
        time.sleep(0.05)


def demo() -> None:
    for old in DATA.glob("*.sqlite3*"):
        old.unlink()
    seed()
    total = remaining()
    result = backfill_tax.delay(ACCOUNT, 0.2)
    print(f"demo: {total} orders to backfill; enqueued job {result.id}")
    worker = start_worker(1)
    wait_for(lambda: remaining() <= total // 2)
    print(f"demo: {total - remaining()} done; asking worker 1 to stop (SIGTERM)")
    worker.terminate()
    worker.wait(60)
    print(f"demo: worker 1 exited; {remaining()} orders still to do, job waiting in the queue")
    worker = start_worker(2)
    wait_for(COMPLETED.is_set)
    assert remaining() == 0
    worker.terminate()
    worker.wait(60)
    print("demo: every order of the account is backfilled")


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "demo"
    {"demo": demo, "seed": seed, "enqueue": lambda: print(backfill_tax.delay(ACCOUNT, 0.2).id)}[command]()
