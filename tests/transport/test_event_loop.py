"""The transport driven by kombu's event loop (what Celery's asynloop does), on every engine.

On PostgreSQL a claim thread claims and the hub delivers; on SQLite and
MariaDB the hub claims too (``celery_sqlbackend.eventloop``).  These pin down
what that must keep: the prefetch count holds for claimed-but-undelivered jobs
too, whatever the hub never delivered goes back to ready when the connection
closes, in place, and acks that no claim carries are written alone only once
they have waited for one.
"""
from __future__ import annotations

from time import monotonic, sleep

from kombu import Connection, Consumer, Queue
from kombu.asynchronous import Hub

import pytest

import celery_sqlbackend  # noqa: F401  (registers sqlq)
from celery_sqlbackend.eventloop import ClaimFeed
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


def test_the_hub_writes_acks_alone_only_once_they_have_waited_for_a_claim_to_carry_them(db_url):
    # A busy worker's claims carry the acks since the last claim, every few milliseconds.  The hub's
    # timer for acks that no claim carries must write only those that have waited ``write_delay``:
    # it used to write whatever was queued when it fired, a transaction (and a durable commit) of
    # its own for acks the next claim was about to carry.
    with Connection(f"sqlq+{db_url}", transport_options=OPTS) as conn:
        _publish(conn, n=1)
        msg = conn.SimpleQueue("q").get(block=True, timeout=5)
        channel = msg.channel
        acks = channel.process.acks
        # What a worker's ack of a finished task does (``Channel._on_ack``): queue the finish.
        acks.finish_later(*channel._take_claim(msg.delivery_tag))
        hub = Hub()
        feed = ClaimFeed(conn.transport, hub, on_hub=True)
        try:
            feed.write_delay = 60.0     # the ack is younger than that: a claim may still carry it
            feed._flush_on_hub(acks)
            assert count(db_url, "jobs where finished_at is not null") == 0
            assert acks.has_pending_writes and feed._flush_due is not None   # waits out the ack's age
            feed._flush_due.cancel()
            feed.write_delay = 0.0      # the ack has waited long enough: the hub writes it
            feed._flush_on_hub(acks)
            assert not acks.has_pending_writes and feed._flush_due is None
            assert count(db_url, "jobs where finished_at is not null") == 1
            assert count(db_url, "claimed_executions") == 0
        finally:
            feed.stop()
