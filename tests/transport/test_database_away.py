"""The database going away under a consumer: nothing delivered is dropped, every ack lands later.

A real PostgreSQL server of the test's own, stopped and started again at
chosen points, with kombu's own API (no Celery worker): each step waits on
the server (``pg_ctl -w``) or on rows, never on time.

Why it matters: a claim loop that let the database's disconnect escape would
look to Celery like a lost broker connection, and Celery then drops the
deliveries it had prefetched, even those a pool process is already running,
whose acks it discards (``AsynPool.flush``): such a job ran, its claim was
released later, and it ran again.
"""
from __future__ import annotations

import contextlib

import pytest
from kombu import Connection, Producer, Queue

import celery_sqlbackend  # noqa: F401  (registers sqlq)
from celery_sqlbackend.processes import local_process
from celery_sqlbackend.worker_hooks import WorkerHooks
from tests.harness import rows, wait_until

OPTS = {"create_tables": True, "polling_interval": 0.05, "heartbeat_interval": 0.2}


def _publish(conn, n: int) -> None:
    producer = Producer(conn.default_channel)
    for i in range(n):
        producer.publish({"i": i}, routing_key="q", declare=[Queue("q")], serializer="json")


def _finished(url: str) -> list[tuple]:
    return rows(url, "select id, finished_at is not null, deliveries from sqlq_jobs order by id")


def test_a_consumer_waits_out_a_database_restart_and_its_acks_land_after(private_pg):
    url = private_pg.url()
    with Connection(f"sqlq+{url}", transport_options=OPTS) as conn:
        _publish(conn, 3)
        got = []
        with conn.Consumer(Queue("q"), callbacks=[lambda body, message: got.append(message)],
                           prefetch_count=2) as consumer:
            conn.drain_events(timeout=5)
            conn.drain_events(timeout=5)      # (one delivery per call: the second of the claimed two)
            assert [m.payload["i"] for m in got] == [0, 1]
            channel = consumer.channel

            private_pg.stop()
            got[0].ack()      # the database is away: deferred, not lost
            # A prefetch slot is free, so this round claims, and cannot reach the
            # database: kombu's loop hears "nothing yet", not "connection lost".
            with pytest.raises(TimeoutError):
                conn.drain_events(timeout=0.5)
            assert not channel.closed
            assert len(got) == 2

            private_pg.start()
            # The deferred ack is written by the heartbeat thread, fenced on the claim.
            wait_until(lambda: _finished(url)[0][1], timeout=30, message="the ack made while the database was away")
            got[1].ack()
            # The loop claims again once the server is back (its first try may meet a stale connection).
            conn.drain_events(timeout=10)
            assert [m.payload["i"] for m in got] == [0, 1, 2]
            got[2].ack()
    # Each job delivered once, each recorded finished, nothing left claimed.
    assert _finished(url) == [(1, True, 1), (2, True, 1), (3, True, 1)]
    assert rows(url, "select count(*) from sqlq_claimed_executions") == [(0,)]


def test_a_started_mark_made_while_the_database_is_away_lands_after(private_pg):
    """In a worker an early ack marks the job started, so that a pruner fails it rather
    than running it again: that mark must reach the store even across an outage."""
    url = private_pg.url()
    with Connection(f"sqlq+{url}", transport_options=OPTS) as conn:
        _publish(conn, 1)
        got = []
        with conn.Consumer(Queue("q"), callbacks=[lambda body, message: got.append(message)], prefetch_count=1):
            conn.drain_events(timeout=5)
            [message] = got
            proc = local_process(message.channel.store)
            proc.attach_worker(WorkerHooks(running_tags=lambda: {message.delivery_tag},
                                           stopping=lambda: False, terminating=lambda: False))
            private_pg.stop()
            message.ack()     # Celery's early ack: the task is starting
            with contextlib.suppress(Exception):   # (the heartbeat thread may have tried first)
                proc.acks.flush()
            private_pg.start()
            try:
                wait_until(lambda: rows(url, "select count(*) from sqlq_claimed_executions where acked_at is not "
                                             "null") == [(1,)],
                           timeout=30, message="the started mark made while the database was away")
                assert rows(url, "select finished_at from sqlq_jobs") == [(None,)]
            finally:
                proc.stop()    # (a worker's process is stopped by the worker, not by closing its channel)


def test_a_delivery_put_back_by_a_lost_connection_is_kept_then_failed_never_run_again(private_pg):
    """Celery may run a delivery it dropped on a lost connection without ever acking it
    (``AsynPool.flush``): its claim stays while the process lives, and is never released."""
    url = private_pg.url()
    conn = Connection(f"sqlq+{url}", transport_options=OPTS)
    _publish(conn, 1)
    got = []
    consumer = conn.Consumer(Queue("q"), callbacks=[lambda body, message: got.append(message)], prefetch_count=1)
    consumer.consume()
    conn.drain_events(timeout=5)
    proc = local_process(got[0].channel.store)
    proc.attach_worker(WorkerHooks(running_tags=set, stopping=lambda: False, terminating=lambda: False))
    conn.close()      # kombu puts the unacked delivery back (``Channel._restore``)
    wait_until(lambda: rows(url, "select count(*) from sqlq_claimed_executions where acked_at is not null")
               == [(1,)], timeout=30, message="the put-back delivery to be recorded as possibly started")
    assert proc.reconcile(grace=0) == []     # however long it has been, it is not released
    assert rows(url, "select count(*) from sqlq_ready_executions") == [(0,)]
    proc.stop()
    proc.deregister()
    # Never acked: it may have run, so it is failed, not handed to another worker.
    assert rows(url, "select count(*) from sqlq_failed_executions") == [(1,)]
    assert rows(url, "select count(*) from sqlq_ready_executions") == [(0,)]
