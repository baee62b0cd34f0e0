"""The Celery app every benchmark run uses; the broker comes from the environment.

Tasks append one line to a file opened with O_APPEND (one write syscall, no
broker or backend involvement), so completion is measured the same way for
every broker.
"""
import os
import time

import celery_sqlbackend  # noqa: F401
from celery import Celery

app = Celery("benchapp", broker=os.environ["BENCH_BROKER"], backend=os.environ.get("BENCH_BACKEND") or None)
app.conf.update(
    broker_transport_options=eval(os.environ.get("BENCH_TRANSPORT_OPTIONS", "{}")),
    worker_prefetch_multiplier=int(os.environ.get("BENCH_PREFETCH", "4")),
    task_ignore_result=not os.environ.get("BENCH_BACKEND"),
    broker_connection_retry_on_startup=True,
    result_expires=None,
)
def _mark(line: bytes) -> None:
    # Opened per call: the benchmark starts each phase with a fresh file.
    fd = os.open(os.environ["BENCH_MARKS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@app.task(name="bench.noop")
def noop(i):
    _mark(b"x\n")


@app.task(name="bench.once")
def once(i):
    # The job's number: the two-worker run counts duplicates and losses from these lines.
    _mark(f"{i}\n".encode())


@app.task(name="bench.latency")
def latency(sent_at):
    _mark(f"{time.time() - sent_at:.6f}\n".encode())


@app.task(name="bench.echo", ignore_result=False)
def echo(i):
    return i
