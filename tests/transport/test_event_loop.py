"""The transport driven by kombu's event loop (what Celery's asynloop does), on SQLite and PostgreSQL.

On PostgreSQL a claim thread claims and the hub delivers; on SQLite the hub
claims too (``celery_sqlbackend.eventloop``).  These pin down what that must
keep: the prefetch count holds for claimed-but-undelivered jobs too, and
whatever the hub never delivered goes back to ready when the connection
closes, in place.
"""
from __future__ import annotations

from time import monotonic, sleep

from kombu import Connection, Consumer, Queue
from kombu.asynchronous import Hub

import pytest

import celery_sqlbackend  # noqa: F401  (registers sqlq)
from tests.harness import rows

from .test_kombu_api import OPTS, _publish

EVENT_LOOP = {**OPTS, "event_loop": True}   # the default; said here all the same


def count(db_url, table):
    return rows(db_url, f"select count(*) from sqlq_{table}")[0][0]


def consume_through_hub(conn, prefetch: int):
    """Register ``conn`` with a kombu Hub, as Celery's asynloop does, and consume queue q.

    Returns the hub and the list that deliveries are appended to.
    """
    hub = Hub()
    conn.transport.register_with_event_loop(conn.connection, hub)
    delivered = []
    Consumer(conn.channel(), [Queue("q")], callbacks=[lambda body, msg: delivered.append(msg)],
             prefetch_count=prefetch).consume()
    return hub, delivered


def run_hub_until(hub, predicate, timeout=10.0):
    deadline = monotonic() + timeout
    while not predicate():
        assert monotonic() < deadline, "the hub did not get there in time"
        hub.run_once()


def test_the_default_loop_is_the_event_loop_claiming_on_a_thread_on_postgresql_and_on_the_hub_elsewhere(db_url):
    with Connection(f"sqlq+{db_url}", transport_options=OPTS) as conn:
        assert conn.transport.implements.asynchronous
        hub = Hub()
        conn.transport.register_with_event_loop(conn.connection, hub)
        feed = conn.transport._feed
        assert feed.on_hub == (not db_url.startswith("postgresql")) and (feed._thread is None) == feed.on_hub
    with Connection(f"sqlq+{db_url}", transport_options={**OPTS, "event_loop": False}) as conn:
        assert not conn.transport.implements.asynchronous


def test_through_the_event_loop_a_consumer_holds_no_more_than_its_prefetch(db_url):
    with Connection(f"sqlq+{db_url}", transport_options=EVENT_LOOP) as conn:
        _publish(conn, n=10)
        hub, got = consume_through_hub(conn, prefetch=3)
        run_hub_until(hub, lambda: len(got) >= 3)
        end = monotonic() + 0.5     # bounded look: a claim thread that over-claimed would deliver more
        while monotonic() < end:
            hub.run_once()
        assert len(got) == 3 and count(db_url, "claimed_executions") == 3
        got[0].ack()
        run_hub_until(hub, lambda: len(got) >= 4)
        assert [m.payload["i"] for m in got] == [0, 1, 2, 3]      # in order
        assert count(db_url, "claimed_executions") == 3
    # Closed: the three delivered, unacked jobs are back in ready, in place.
    assert count(db_url, "claimed_executions") == 0
    assert count(db_url, "ready_executions") == 9 and count(db_url, "jobs where finished_at is not null") == 1


@pytest.mark.postgres
def test_a_batch_claimed_but_never_delivered_goes_back_to_ready_when_the_connection_closes(pg_db_url):
    # (A claim thread's batch waits for the hub; a claim on the hub is delivered in the same call.)
    db_url = pg_db_url
    with Connection(f"sqlq+{db_url}", transport_options=EVENT_LOOP) as conn:
        _publish(conn, n=5)
        _, got = consume_through_hub(conn, prefetch=5)
        deadline = monotonic() + 10
        while count(db_url, "claimed_executions") < 5:   # claimed by the thread; the hub never runs
            assert monotonic() < deadline, "the claim thread claimed nothing"
            sleep(0.01)   # (a poll of the rows, not synchronisation)
        assert got == []
    assert count(db_url, "claimed_executions") == 0 and count(db_url, "ready_executions") == 5
    [(deliveries,)] = rows(db_url, "select max(deliveries) from sqlq_jobs")
    assert deliveries == 1
