"""Bindings kept in the database, through kombu's API: routing across connections, and nothing piling up."""
from __future__ import annotations

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue

import celery_sqlbackend  # noqa: F401  (registers sqlq)
from celery_sqlbackend import admin, fanout
from celery_sqlbackend.store import store_for
from celery_sqlbackend.options import Options
from tests.harness import rows

OPTS = {"create_tables": True, "polling_interval": 0.05}


@pytest.fixture
def connect(db_url):
    opened = []

    def connect():
        c = Connection(f"sqlq+{db_url}", transport_options=OPTS)
        opened.append(c)
        return c
    yield connect
    for c in opened:
        c.release()


def _store(db_url):
    return store_for(db_url, Options.from_mapping(OPTS))


def _bindings(db_url):
    return sorted(rows(db_url, "SELECT exchange, queue_name, routing_key FROM sqlq_bindings"))


def _ready(db_url, queue):
    return rows(db_url, "SELECT count(*) FROM sqlq_ready_executions WHERE queue_name = :q", {"q": queue})[0][0]


def _drain(conn, queues, n=1, timeout=3):
    got = []
    with Consumer(conn, queues, callbacks=[lambda body, msg: got.append(body)], no_ack=True, accept=["json"]):
        while len(got) < n:
            conn.drain_events(timeout=timeout)
    return got


def test_topic_and_reply_routing_reach_queues_bound_by_another_connection(connect, db_url):
    reader, writer = connect(), connect()
    events = Exchange("ev", type="topic", durable=False)
    replies = Exchange("rep", type="direct", durable=False)
    q_ev = Queue("ev.reader", events, routing_key="task.#", expires=30, auto_delete=True)
    q_rep = Queue("oid1.rep", replies, routing_key="oid1", expires=30, auto_delete=True)
    q_ev(reader.default_channel).declare()
    q_rep(reader.default_channel).declare()

    producer = Producer(writer.default_channel, serializer="json")
    producer.publish({"e": 1}, exchange=events, routing_key="task.succeeded", declare=[events])
    producer.publish({"e": 2}, exchange=events, routing_key="worker.heartbeat", declare=[events])  # no match
    producer.publish({"r": 1}, exchange=replies, routing_key="oid1", declare=[replies])
    producer.publish({"r": 2}, exchange=replies, routing_key="gone", declare=[replies])   # nobody: dropped
    assert _drain(reader, [q_ev]) == [{"e": 1}]
    assert _drain(reader, [q_rep]) == [{"r": 1}]
    # Nothing was dead-lettered or left over anywhere.
    assert rows(db_url, "SELECT queue_name FROM sqlq_ready_executions") == []
    # Expiring bindings carry their expiry; the auto-delete queues went with their consumers.
    assert _bindings(db_url) == []


def test_expired_binding_is_removed_with_its_backlog_and_a_live_consumer_rebinds(connect, db_url):
    reader, writer = connect(), connect()
    bc = Exchange("bc", type="fanout", durable=False)
    # Not auto-delete: survives its consumer.  (Expired below by hand.  2 s: a poll refreshes it after
    # a quarter of that, and the rebound binding outlives the last publish even on a slow machine.)
    queue = Queue("node.bc", bc, expires=2)
    queue(reader.default_channel).declare()
    producer = Producer(writer.default_channel, serializer="json")
    for i in range(3):
        producer.publish({"i": i}, exchange=bc, declare=[bc])
    assert _ready(db_url, "node.bc") == 3

    store = _store(db_url)
    rows(db_url, "UPDATE sqlq_bindings SET expires_at = '2000-01-01 00:00:00'")   # reader went quiet
    report = fanout.maintain(store)
    assert report.expired_queues == ["node.bc"] and report.dropped_messages == 3
    assert _bindings(db_url) == [] and _ready(db_url, "node.bc") == 0

    # The reader was only busy, not gone: its next poll binds the queue again.
    producer.publish({"i": "lost"}, exchange=bc, declare=[bc])   # unroutable meanwhile: dropped
    assert _ready(db_url, "node.bc") == 0
    with Consumer(reader, [queue], no_ack=True, accept=["json"]):
        try:
            reader.drain_events(timeout=1.0)   # (longer than a quarter of the expiry: a refresh is due)
        except TimeoutError:
            pass
    assert _bindings(db_url) == [("bc", "node.bc", "")]
    producer.publish({"i": "after"}, exchange=bc, declare=[bc])
    assert _ready(db_url, "node.bc") == 1


def test_transient_backlog_is_bounded_by_expiration_age_and_count(connect, db_url):
    reader, writer = connect(), connect()
    bc = Exchange("bc2", type="fanout", durable=False)
    queue = Queue("slow.bc2", bc, expires=60)
    queue(reader.default_channel).declare()
    producer = Producer(writer.default_channel, serializer="json")
    producer.publish({"x": "expired"}, exchange=bc, declare=[bc], expiration=0.001)
    for i in range(5):
        producer.publish({"i": i}, exchange=bc, declare=[bc])
    store = _store(db_url)
    report = fanout.maintain(store, max_backlog=2)
    assert report.dropped_messages == 4          # the expired one, then the oldest two beyond the cap
    assert report.expired_queues == []
    got = _drain(reader, [queue], n=2)
    assert got == [{"i": 3}, {"i": 4}]

    # admin.prune runs the same maintenance.
    rows(db_url, "UPDATE sqlq_bindings SET expires_at = '2000-01-01 00:00:00'")
    assert admin.prune(store).expired_queues == ["slow.bc2"]


def test_task_queue_bindings_do_not_expire(connect, db_url):
    conn = connect()
    tasks = Exchange("tasks", type="direct")
    Queue("work", tasks, routing_key="work")(conn.default_channel).declare()
    assert rows(db_url, "SELECT queue_name, expires_at FROM sqlq_bindings") == [("work", None)]
    fanout.maintain(_store(db_url))
    assert _bindings(db_url) == [("tasks", "work", "work")]
