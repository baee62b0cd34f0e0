"""The backend class in this process: configuration, serializers, waiting, retries (real databases)."""
from __future__ import annotations

import pickle
import socket
import threading
import time
import uuid

import pytest
from celery import Celery, states
from celery.exceptions import ImproperlyConfigured
from kombu.exceptions import ContentDisallowed, EncodeError
from sqlalchemy import event
from sqlalchemy.engine import make_url

import celery_sqlbackend  # noqa: F401
from celery_sqlbackend.backend import SQLBackend
from celery_sqlbackend.store.dialects import is_disconnect
from celery_sqlbackend.errors import ConfigurationError

from tests.harness import wait_until

OPTS = {"create_tables": True}


def make(url, **conf):
    app = Celery("unit", broker=f"sqlq+{url}", backend=f"sqlq+{url}", set_as_current=False)
    app.conf.update(broker_transport_options=OPTS, **conf)
    return app


@pytest.fixture
def app(backend_db):
    return make(backend_db[1])


def tid():
    return uuid.uuid4().hex


class Point:
    def __init__(self, x):
        self.x = x

    def __eq__(self, other):
        return isinstance(other, Point) and other.x == self.x


# --------------------------------------------------------------------------- configuration

def test_resolved_through_the_entry_point(tmp_path):
    app = Celery("c", broker="memory://", backend=f"sqlq+sqlite:///{tmp_path}/r.sqlite3", set_as_current=False)
    assert isinstance(app.backend, SQLBackend)
    assert app.backend.db_url == f"sqlite:///{tmp_path}/r.sqlite3"
    assert app.backend.as_uri() == f"sqlq+sqlite:///{tmp_path}/r.sqlite3"


def test_bare_scheme_means_the_broker_database(tmp_path):
    app = Celery("c", broker=f"sqlq+sqlite:///{tmp_path}/j.sqlite3", backend="sqlq://", set_as_current=False)
    app.conf.broker_transport_options = {"table_prefix": "jobs_"}
    assert app.backend.db_url == f"sqlite:///{tmp_path}/j.sqlite3"
    assert app.backend.store.t.results.name == "jobs_results"


def test_bare_scheme_without_an_sqlq_broker_says_what_to_write():
    app = Celery("c", broker="memory://", backend="sqlq://", set_as_current=False)
    with pytest.raises(ConfigurationError, match="sqlq\\+<SQLAlchemy URL>"):
        app.backend


def test_unknown_option_is_an_error(tmp_path):
    app = Celery("c", broker="memory://", backend=f"sqlq+sqlite:///{tmp_path}/r.sqlite3", set_as_current=False)
    app.conf.result_backend_transport_options = {"tabel_prefix": "x_"}
    with pytest.raises(ConfigurationError, match="tabel_prefix"):
        app.backend


def test_pickle_needs_an_explicit_opt_in(tmp_path):
    app = make(f"sqlite:///{tmp_path}/r.sqlite3", result_serializer="pickle")
    with pytest.raises(ImproperlyConfigured, match="result_accept_content"):
        app.backend


def test_backend_pickles_for_prefork(app):
    clone = pickle.loads(pickle.dumps(app.backend))
    assert clone.db_url == app.backend.db_url


# --------------------------------------------------------------------------- serializers

def test_json_roundtrip_and_unencodable(app):
    b = app.backend
    t = tid()
    b.store_result(t, {"a": [1, 2.5, "x", None, True]}, states.SUCCESS)
    assert app.AsyncResult(t).get(timeout=1) == {"a": [1, 2.5, "x", None, True]}
    with pytest.raises(EncodeError, match="cannot be stored.*json"):
        b.store_result(tid(), Point(1), states.SUCCESS)


def test_pickle_when_allowed_and_refused_when_not(backend_db):
    url = backend_db[1]
    writer = make(url, result_serializer="pickle", result_accept_content=["pickle", "json"])
    t = tid()
    writer.backend.store_result(t, Point(7), states.SUCCESS)
    assert writer.AsyncResult(t).get(timeout=1) == Point(7)
    # A reader that accepts JSON only refuses the pickled row: no code runs.
    reader = make(url)
    with pytest.raises(ContentDisallowed):
        reader.AsyncResult(t).get(timeout=1)


def test_other_serializers(backend_db):
    for name, module in (("msgpack", "msgpack"), ("yaml", "yaml")):
        try:
            __import__(module)
        except ImportError:
            continue
        app = make(backend_db[1], result_serializer=name, result_accept_content=[name])
        t = tid()
        app.backend.store_result(t, {"n": [1, 2]}, states.SUCCESS)
        assert app.AsyncResult(t).get(timeout=1) == {"n": [1, 2]}


def test_compression(backend_db):
    app = make(backend_db[1], result_compression="zlib")
    t = tid()
    app.backend.store_result(t, "x" * 10000, states.SUCCESS)
    row = app.backend.store.results.get(t)
    assert len(bytes(row.payload)) < 1000
    assert make(backend_db[1]).AsyncResult(t).get(timeout=1) == "x" * 10000


# --------------------------------------------------------------------------- waiting

def _selects(engine, into):
    def count(conn, cursor, statement, *a):
        if "results" in statement and statement.lstrip().upper().startswith("SELECT"):
            into.append(statement)
    event.listen(engine, "before_cursor_execute", count)
    return lambda: event.remove(engine, "before_cursor_execute", count)


def test_group_of_stored_results_is_one_query(app):
    b = app.backend
    ids = [tid() for _ in range(1000)]
    for i, t in enumerate(ids):
        b.store_result(t, i, states.SUCCESS)
    gr = app.GroupResult(tid(), [app.AsyncResult(t) for t in ids])
    seen = []
    stop = _selects(b.store.engine, seen)
    try:
        t0 = time.monotonic()
        assert gr.get(timeout=5) == list(range(1000))
        elapsed = time.monotonic() - t0
    finally:
        stop()
    assert len(seen) == 1
    assert elapsed < 1.0


def test_waiter_wakes_soon_after_the_result_lands(app, backend_db):
    """interval=5 is only the fallback: PostgreSQL wakes on NOTIFY, SQLite polls at <= polling_interval."""
    b = app.backend
    t = tid()
    landed = []

    def later():
        time.sleep(0.3)
        b.store_result(t, "here", states.SUCCESS)
        landed.append(time.monotonic())
    th = threading.Thread(target=later)
    th.start()
    assert app.AsyncResult(t).get(timeout=10, interval=5) == "here"
    woke = time.monotonic()
    th.join()
    latency = woke - landed[0]
    limit = 0.1 if backend_db[0] == "postgres" else 0.3
    assert latency < limit, f"woke {latency * 1000:.0f} ms after the result landed"


def test_many_threads_wait_on_one_listener(app):
    b = app.backend
    ids = [tid() for _ in range(6)]
    got = {}

    def wait(t):
        got[t] = app.AsyncResult(t).get(timeout=20, interval=5)
    threads = [threading.Thread(target=wait, args=(t,)) for t in ids]
    for th in threads:
        th.start()
    t0 = time.monotonic()
    for i, t in enumerate(ids):
        b.store_result(t, i, states.SUCCESS)
    for th in threads:
        th.join(20)
    assert got == {t: i for i, t in enumerate(ids)}
    assert time.monotonic() - t0 < 3


def test_get_times_out(app):
    t0 = time.monotonic()
    with pytest.raises(Exception, match="timed out"):
        app.AsyncResult(tid()).get(timeout=0.3, interval=0.1)
    assert time.monotonic() - t0 < 2


def test_an_earlier_attempts_retry_never_overwrites_the_last_attempts_outcome(app):
    """Celery's retry publishes the next attempt before it stores RETRY; a pool process woken at once
    may store that attempt's FAILURE first.  The late RETRY must not replace it (``.get()`` would
    then wait for ever), with or without ``result_extended``."""
    from celery.app.task import Context

    b = app.backend
    for extended in (False, True):
        app.conf.result_extended = extended
        t = tid()
        b.mark_as_failure(t, RuntimeError("again"), request=Context(id=t, retries=2))
        b.mark_as_retry(t, RuntimeError("again"), request=Context(id=t, retries=1))
        b.mark_as_retry(t, RuntimeError("again"))          # (no request at all: still not over FAILURE)
        assert b.get_status(t) == states.FAILURE, extended
        with pytest.raises(RuntimeError):
            app.AsyncResult(t).get(timeout=5, interval=0.1)
        later = tid()
        b.mark_as_retry(later, RuntimeError("once"), request=Context(id=later, retries=0))
        b.mark_as_done(later, "ok", request=Context(id=later, retries=1))   # in order: the later wins
        assert b.get_status(later) == states.SUCCESS


# --------------------------------------------------------------------------- connection drops

class Proxy:
    """A TCP forwarder to the database that the test can cut and restore."""

    def __init__(self, host, port):
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.refused = 0
        self.pairs = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                self.refused += 1
                client.close()
                continue
            server = socket.create_connection(self.target)
            with self.lock:
                self.pairs.append((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        self.up = False
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for a, b in pairs:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass

    def close(self):
        self.cut()
        self.listener.close()


def test_dropped_database_is_retried_with_backoff(backend_db):
    if backend_db[0] != "postgres":
        pytest.skip("needs a network database")
    url = make_url(backend_db[1])
    proxy = Proxy(url.host, url.port or 5432)
    try:
        proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        app = make(proxied, result_backend_transport_options={"use_notify": False})
        b = app.backend
        t = tid()
        b.store_result(t, "before", states.SUCCESS)
        proxy.cut()
        done = []
        th = threading.Thread(target=lambda: done.append(b.store_result(t + "x", "after", states.SUCCESS)))
        th.start()
        wait_until(lambda: proxy.refused >= 2, 20, message="reconnect attempts")
        proxy.up = True
        th.join(30)
        assert done == ["after"]
        assert app.AsyncResult(t + "x").get(timeout=5) == "after"
    finally:
        proxy.close()


def test_disconnects_are_told_apart_from_sql_errors(tmp_path):
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError
    engine = create_engine(f"sqlite:///{tmp_path}/x.sqlite3")
    with pytest.raises(OperationalError) as info:
        with engine.connect() as conn:
            conn.execute(text("SELECT * FROM no_such_table"))
    assert not is_disconnect(info.value)
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return
    port = socket.create_server(("127.0.0.1", 0))
    closed = port.getsockname()[1]
    port.close()
    engine = create_engine(f"postgresql+psycopg://u@127.0.0.1:{closed}/d")
    with pytest.raises(OperationalError) as info:
        engine.connect()
    assert is_disconnect(info.value)
