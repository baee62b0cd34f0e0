"""The transport through kombu's own API, against real SQLite and PostgreSQL.

No Celery worker here: these pin down the storage semantics (claims, acks,
requeue in place, priorities, ETA, purge) one operation at a time.
"""
from __future__ import annotations

import contextlib
import json
from datetime import datetime, timedelta, timezone

import pytest
from kombu import Connection, Exchange, Producer, Queue

import celery_sqlbackend  # noqa: F401  (registers sqlq)
from celery_sqlbackend.errors import ConfigurationError
from celery_sqlbackend.store import store_for
from celery_sqlbackend.options import Options
from tests.harness import rows

OPTS = {"create_tables": True, "polling_interval": 0.05}


@pytest.fixture
def conn(db_url):
    with Connection(f"sqlq+{db_url}", transport_options=OPTS) as c:
        yield c


def _publish(conn, queue="q", n=1, **kw):
    producer = Producer(conn.default_channel)
    for i in range(n):
        producer.publish({"i": i, **kw.pop("extra", {})}, routing_key=queue, declare=[Queue(queue)],
                         serializer="json", **kw)


def _get(conn, queue="q", no_ack=False):
    return conn.SimpleQueue(queue, no_ack=no_ack).get(block=True, timeout=2)


def test_publish_get_ack_marks_the_job_finished_and_drops_the_claim(conn, db_url):
    _publish(conn)
    assert rows(db_url, "select count(*) from sqlq_ready_executions") == [(1,)]
    msg = _get(conn)
    assert msg.payload == {"i": 0}
    assert rows(db_url, "select count(*) from sqlq_ready_executions") == [(0,)]
    assert rows(db_url, "select count(*) from sqlq_claimed_executions") == [(1,)]
    msg.ack()
    assert rows(db_url, "select count(*) from sqlq_claimed_executions") == [(0,)]
    [(finished,)] = rows(db_url, "select finished_at from sqlq_jobs")
    assert finished is not None


def test_every_claim_names_a_registered_process(conn, db_url):
    _publish(conn)
    _get(conn)
    claims = rows(db_url, "select c.process_id, p.id from sqlq_claimed_executions c "
                          "left join sqlq_processes p on p.id = c.process_id")
    assert len(claims) == 1 and claims[0][0] == claims[0][1]


def test_priorities_run_higher_first_and_fifo_within_a_priority(conn):
    producer = Producer(conn.default_channel)
    order = [(0, "a"), (9, "b"), (5, "c"), (9, "d"), (0, "e"), (5, "f")]
    for prio, name in order:
        producer.publish({"name": name}, routing_key="q", declare=[Queue("q")], priority=prio)
    q = conn.SimpleQueue("q")
    got = []
    for _ in order:
        m = q.get(timeout=2)
        got.append(m.payload["name"])
        m.ack()
    assert got == ["b", "d", "c", "f", "a", "e"]


def test_reject_with_requeue_puts_the_same_job_back_without_a_copy(conn, db_url):
    _publish(conn)
    msg = _get(conn)
    [(job_id,)] = rows(db_url, "select job_id from sqlq_claimed_executions")
    msg.reject(requeue=True)
    assert rows(db_url, "select job_id from sqlq_ready_executions") == [(job_id,)]
    assert rows(db_url, "select count(*) from sqlq_jobs") == [(1,)]
    again = _get(conn)
    assert again.payload == {"i": 0}
    assert again.delivery_info["redelivered"] is True
    assert again.delivery_tag != msg.delivery_tag
    again.ack()


def test_reject_without_requeue_moves_the_job_to_failed(conn, db_url):
    _publish(conn)
    _get(conn).reject(requeue=False)
    [(cls, error)] = rows(db_url, "select error_class, error from sqlq_failed_executions")
    assert cls == "RejectedError" and "without requeue" in error


def test_closing_a_channel_restores_unacked_deliveries_in_place(db_url):
    url = f"sqlq+{db_url}"
    with Connection(url, transport_options=OPTS) as c:
        _publish(c, n=3)
        q = c.SimpleQueue("q")
        q.get(timeout=2)
        q.get(timeout=2).ack()
    # one acked (finished), two back in ready: one delivered-unacked, one never delivered
    assert rows(db_url, "select count(*) from sqlq_ready_executions") == [(2,)]
    assert rows(db_url, "select count(*) from sqlq_claimed_executions") == [(0,)]
    assert rows(db_url, "select count(*) from sqlq_jobs") == [(3,)]
    assert rows(db_url, "select count(*) from sqlq_processes") == [(0,)]


def test_a_future_eta_is_stored_as_scheduled_and_delivered_when_due(conn, db_url):
    store_for(db_url, Options(**OPTS)).ensure_schema()   # (DDL on a fresh MariaDB can take longer than the ETA)
    eta = datetime.now(timezone.utc) + timedelta(seconds=3)   # (room for the checks below on a busy machine)
    _publish(conn, headers={"eta": eta.isoformat(), "id": "t-1", "task": "x.y"})
    assert rows(db_url, "select count(*) from sqlq_scheduled_executions") == [(1,)]
    assert rows(db_url, "select count(*) from sqlq_ready_executions") == [(0,)]
    q = conn.SimpleQueue("q")
    with pytest.raises(q.Empty):
        q.get(timeout=0.5)
    msg = q.get(timeout=10)
    assert datetime.now(timezone.utc) >= eta - timedelta(milliseconds=50)
    assert msg.headers["id"] == "t-1"
    msg.ack()
    assert rows(db_url, "select task_id, task_name from sqlq_jobs") == [("t-1", "x.y")]


def test_purge_and_size_count_waiting_jobs_of_one_queue(conn):
    _publish(conn, "a", n=4)
    _publish(conn, "b", n=2)
    chan = conn.default_channel
    assert chan.queue_declare("a", passive=True).message_count == 4
    assert chan.queue_purge("a") == 4
    assert chan.queue_declare("a", passive=True).message_count == 0
    assert chan.queue_declare("b", passive=True).message_count == 2


def test_a_payload_that_cannot_be_decoded_is_failed_and_the_consumer_goes_on(conn, db_url):
    _publish(conn, n=2)
    store = store_for(db_url, Options.from_mapping(OPTS))
    first = min(r[0] for r in rows(db_url, "select id from sqlq_jobs"))
    store.run(lambda c: c.execute(store.t.jobs.update().where(store.t.jobs.c.id == first)
                                  .values(payload="{not json")))
    msg = _get(conn)
    assert msg.payload == {"i": 1}
    msg.ack()
    [(job_id, cls, error)] = rows(db_url, "select job_id, error_class, error from sqlq_failed_executions")
    assert job_id == first and cls == "UndecodableMessageError" and "not a kombu message" in error


def test_fanout_reaches_every_bound_queue_across_connections(db_url):
    url = f"sqlq+{db_url}"
    ex = Exchange("bcast", type="fanout")
    with Connection(url, transport_options=OPTS) as a, Connection(url, transport_options=OPTS) as b:
        qa = a.SimpleQueue(Queue("qa", ex))
        qb = b.SimpleQueue(Queue("qb", ex))
        Producer(a.default_channel).publish({"hello": 1}, exchange=ex)
        assert qa.get(timeout=2).payload == {"hello": 1}
        assert qb.get(timeout=2).payload == {"hello": 1}


def test_unknown_transport_option_is_an_error_that_lists_the_known_ones(sqlite_url):
    with pytest.raises(ConfigurationError, match="heartbeat_intreval.*known options are"):
        with Connection(f"sqlq+{sqlite_url}", transport_options={"heartbeat_intreval": 3}) as c:
            c.default_channel


def test_a_malformed_database_url_says_what_to_write():
    with pytest.raises(ConfigurationError, match="notadb.*sqlq\\+sqlite:///"):
        with Connection("sqlq+notadb://x/y", transport_options={}) as c:
            c.default_channel


def test_payload_is_stored_as_readable_json(conn, db_url):
    _publish(conn)
    [(payload,)] = rows(db_url, "select payload from sqlq_jobs")
    assert json.loads(payload)["properties"]["delivery_info"]["routing_key"] == "q"


def test_sqlq_settings_in_celery_config_reach_the_worker_store(sqlite_url):
    from celery import Celery
    from celery_sqlbackend import lifecycle
    app = Celery("cfg", broker=f"sqlq+{sqlite_url}")
    app.conf.sqlq_heartbeat_interval = 7
    app.conf.sqlq_alive_threshold = 30
    app.conf.broker_transport_options = {"alive_threshold": 40}
    lifecycle.on_celeryd_init(conf=app.conf)
    opts = lifecycle.broker_store(app).options
    assert (opts.heartbeat_interval, opts.alive_threshold) == (7, 40)   # explicit transport option wins
    assert app.conf.broker_transport_options == {"heartbeat_interval": 7, "alive_threshold": 40}


def test_a_busy_consumer_claims_once_half_its_prefetch_is_free_unless_nothing_is_waiting(conn, db_url, monkeypatch):
    """Fewer, larger claim transactions: with deliveries still waiting to start, a claim waits
    until half the prefetch is free; deliveries already running (acks_late) are not waiting."""
    from kombu import Consumer
    from celery_sqlbackend.worker_hooks import WorkerHooks
    _publish(conn, n=20)
    got = []
    consumer = Consumer(conn.channel(), [Queue("q")], callbacks=[lambda body, m: got.append(m)], accept=["json"])
    consumer.qos(prefetch_count=4)
    with consumer:
        conn.drain_events(timeout=2)
        # One claim of the whole prefetch, delivered one message per call (as kombu's virtual transports do).
        assert len(got) == 1 and rows(db_url, "select count(*) from sqlq_claimed_executions") == [(4,)]
        for _ in range(3):
            conn.drain_events(timeout=2)
        assert len(got) == 4
        got[0].ack()                         # one slot free, three deliveries waiting
        assert consumer.channel._claim_limit() == 0
        assert consumer.channel._claim_limit(share=4) == 1     # the event loop's claim thread: a quarter
        assert consumer.channel._claim_limit(1, share=4) == 0  # ...counting what it has not delivered yet
        with pytest.raises(TimeoutError):
            conn.drain_events(timeout=0.3)
        assert len(got) == 4
        got[1].ack()                         # half free: claims two
        conn.drain_events(timeout=2)
        conn.drain_events(timeout=2)
        assert len(got) == 6
        got[2].ack()                         # one free; the other three are running, none waiting
        running = {m.delivery_tag for m in got[3:6]}
        # What a Celery worker would tell the channel (``lifecycle``): these three are running.
        monkeypatch.setattr(consumer.channel.process, "worker",
                            WorkerHooks(running_tags=lambda: running, stopping=lambda: False,
                                        terminating=lambda: False))
        conn.drain_events(timeout=2)
        assert len(got) == 7
    assert rows(db_url, "select count(*) from sqlq_claimed_executions") == [(4,)]


@contextlib.contextmanager
def three_claimed_one_delivered(c):
    """Three jobs published and claimed in one batch (prefetch 3); one drain_events call delivered the first.
    Yields the consumer and the numbers of the messages delivered so far."""
    from kombu import Consumer
    _publish(c, n=3)
    got = []
    consumer = Consumer(c.channel(), [Queue("q")], callbacks=[lambda body, m: got.append(body["i"])],
                        accept=["json"])
    consumer.qos(prefetch_count=3)
    with consumer:
        c.drain_events(timeout=2)
        yield consumer, got


def test_drain_events_delivers_one_message_per_call_and_a_closed_channel_gives_back_the_rest(db_url):
    # kombu's remote-control client stops after as many drain_events calls as it names workers
    # (``Mailbox._collect``): two replies delivered by one call left it waiting out its whole timeout.
    with Connection(f"sqlq+{db_url}", transport_options=OPTS) as c, three_claimed_one_delivered(c) as (consumer, got):
        assert got == [0]                # three claimed, one delivered
        assert rows(db_url, "select count(*) from sqlq_claimed_executions") == [(3,)]
        c.drain_events(timeout=2)
        assert got == [0, 1]
        consumer.channel.close()         # the undelivered third goes back to ready, in place
        assert rows(db_url, "select count(*) from sqlq_claimed_executions where job_id = 3") == [(0,)]
        assert rows(db_url, "select count(*) from sqlq_ready_executions where job_id = 3") == [(1,)]
        assert len(c.transport._held) == 0


def test_a_worker_shutting_down_gives_back_the_rest_of_its_batch_instead_of_delivering_it(db_url, monkeypatch):
    from celery_sqlbackend.worker_hooks import WorkerHooks
    with Connection(f"sqlq+{db_url}", transport_options=OPTS) as c, three_claimed_one_delivered(c) as (consumer, got):
        assert got == [0]
        # What a Celery worker tells the channel once a warm shutdown has begun (``lifecycle``).
        monkeypatch.setattr(consumer.channel.process, "worker",
                            WorkerHooks(running_tags=set, stopping=lambda: True, terminating=lambda: False))
        with pytest.raises(TimeoutError):
            c.drain_events(timeout=0.3)
        assert got == [0]
        assert rows(db_url, "select job_id from sqlq_claimed_executions") == [(1,)]
        assert rows(db_url, "select job_id from sqlq_ready_executions order by job_id") == [(2,), (3,)]
