"""The statements of ``store.results``, run against real databases (no mocks)."""
from __future__ import annotations

import threading
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import event

from celery_sqlbackend.options import Options
from celery_sqlbackend.store import Store, utcnow
from celery_sqlbackend.store import results as sql


@pytest.fixture(scope="module")
def store(backend_db):
    kind, url = backend_db
    s = Store(url, Options(create_tables=True))
    s.ensure_schema()
    return s


def put(store, task_id, status="SUCCESS", payload=b'{"x": 1}', **kw):
    return store.results.store_result(task_id=task_id, status=status, content_type="application/json",
               content_encoding="utf-8", payload=payload, now=kw.pop("now", utcnow()), **kw)


def tid():
    return uuid.uuid4().hex


def test_store_and_get(store):
    t = tid()
    assert put(store, t, "STARTED", b"{}")
    row = store.results.get(task_id=t)
    assert row.status == "STARTED" and bytes(row.payload) == b"{}"
    assert put(store, t, "SUCCESS", b'{"ok": true}', name="n", worker="w", retries=2, queue="q", group_id="g")
    row = store.results.get(task_id=t)
    assert row.status == "SUCCESS" and bytes(row.payload) == b'{"ok": true}'
    assert store.results.exists(task_id=t)
    assert store.results.get(task_id=tid()) is None


def test_success_is_never_overwritten(store):
    t = tid()
    assert put(store, t, "SUCCESS", b'"first"')
    assert not put(store, t, "STARTED", b"{}")
    assert not put(store, t, "FAILURE", b'"late"')
    row = store.results.get(task_id=t)
    assert row.status == "SUCCESS" and bytes(row.payload) == b'"first"'


def test_failure_can_be_replaced_by_a_rerun(store):
    t = tid()
    put(store, t, "FAILURE", b'"boom"')
    assert put(store, t, "SUCCESS", b'"fine"')
    assert store.results.get(task_id=t).status == "SUCCESS"


def test_get_results_only_ready_in_one_query(store):
    ready = [tid() for _ in range(30)]
    for t in ready:
        put(store, t)
    started = tid()
    put(store, started, "STARTED")
    statements = []

    def count(conn, cursor, statement, *a):
        if "results" in statement and statement.lstrip().upper().startswith("SELECT"):
            statements.append(statement)
    event.listen(store.engine, "before_cursor_execute", count)
    try:
        rows = store.results.get_many(task_ids=ready + [started, tid()])
    finally:
        event.remove(store.engine, "before_cursor_execute", count)
    assert {r.task_id for r in rows} == set(ready)
    assert len(statements) == 1
    rows = store.results.get_many(task_ids=[started], states=None)
    assert [r.status for r in rows] == ["STARTED"]


def test_get_results_chunks_huge_lists(store, monkeypatch):
    ids = [tid() for _ in range(25)]
    for t in ids:
        put(store, t)
    monkeypatch.setattr(sql, "IN_CHUNK", 10)
    assert {r.task_id for r in store.results.get_many(task_ids=ids)} == set(ids)


def test_forget(store):
    a, b = tid(), tid()
    put(store, a)
    put(store, b)
    assert store.results.forget(task_ids=[a]) == 1
    assert store.results.get(task_id=a) is None
    assert store.results.get(task_id=b) is not None


def test_groups(store):
    g = tid()
    store.results.save_group(group_id=g, content_type="application/json", content_encoding="utf-8",
        payload=b"[1]", now=utcnow())
    store.results.save_group(group_id=g, content_type="application/json", content_encoding="utf-8",
        payload=b"[2]", now=utcnow())
    assert bytes(store.results.get_group(group_id=g).payload) == b"[2]"
    assert store.results.delete_group(group_id=g)
    assert store.results.get_group(group_id=g) is None


def test_chord_counter_fires_once_when_size_is_reached(store):
    g = tid()
    store.results.chord_start(group_id=g, now=utcnow())
    # Parts may finish before the producer has recorded the size.
    assert store.results.chord_part_done(group_id=g) == sql.ChordCount(1, None, False)
    store.results.chord_set_size(group_id=g, size=3, now=utcnow())
    assert store.results.chord_part_done(group_id=g) == sql.ChordCount(2, 3, False)
    assert store.results.chord_part_done(group_id=g) == sql.ChordCount(3, 3, True)
    # A duplicate part (redelivery) never fires again.
    assert store.results.chord_part_done(group_id=g) == sql.ChordCount(4, 3, False)
    assert store.results.chord_part_done(group_id=tid()) is None


def test_chord_restart_resets_the_counter(store):
    g = tid()
    store.results.chord_start(group_id=g, now=utcnow())
    store.results.chord_set_size(group_id=g, size=1, now=utcnow())
    assert store.results.chord_part_done(group_id=g).fire
    store.results.chord_start(group_id=g, now=utcnow())
    store.results.chord_set_size(group_id=g, size=1, now=utcnow())
    assert store.results.chord_part_done(group_id=g) == sql.ChordCount(1, 1, True)


def test_chord_counter_under_concurrency(store):
    """8 threads count 400 parts: every increment lands, exactly one fires."""
    g = tid()
    store.results.chord_start(group_id=g, now=utcnow())
    store.results.chord_set_size(group_id=g, size=400, now=utcnow())
    fired, errors = [], []

    def part(n):
        try:
            for _ in range(n):
                if store.results.chord_part_done(group_id=g).fire:
                    fired.append(1)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=part, args=(50,)) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors
    assert len(fired) == 1
    row = store.results.get_chord(group_id=g)
    assert row.done == 400 and row.fired


def test_expiry_in_batches(store):
    old = utcnow() - timedelta(days=3)
    ids = [tid() for _ in range(7)]
    for t in ids:
        put(store, t, now=old)
    fresh = tid()
    put(store, fresh)
    g = tid()
    store.results.save_group(group_id=g, content_type="application/json", content_encoding="utf-8",
        payload=b"[]", now=old)
    cutoff = utcnow() - timedelta(days=1)
    batches = []
    while True:
        n = store.results.expire_results(before=cutoff, limit=3)
        batches.append(n)
        if n < 3:
            break
    assert sum(batches) >= 7 and max(batches) <= 3
    assert store.results.get(task_id=ids[0]) is None
    assert store.results.get(task_id=fresh) is not None
    assert store.results.expire_groups(before=cutoff, limit=100) >= 1
    assert store.results.get_group(group_id=g) is None


def test_result_for_job(store):
    t = tid()
    job_id = store.jobs.enqueue(queue="q", payload="{}", task_name="x", task_id=t, priority=0, now=utcnow())
    assert store.results.for_job(job_id=job_id) is None
    put(store, t)
    assert store.results.for_job(job_id=job_id).task_id == t


def test_ready_results_are_notified_on_commit_only(store, backend_db):
    if backend_db[0] != "postgres":
        pytest.skip("LISTEN/NOTIFY is PostgreSQL only")
    import psycopg
    dsn = store.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute(f'LISTEN "{sql.notify_channel(store.t)}"')
        a, b, c = tid(), tid(), tid()
        put(store, a, "STARTED")          # not ready: no notification

        def rolled_back(conn, t, d):
            sql.store_result(conn, t, d, task_id=b, status="SUCCESS", content_type="application/json",
                             content_encoding="utf-8", payload=b"1", now=utcnow())
            raise RuntimeError("roll back")
        with pytest.raises(RuntimeError):
            store.run(rolled_back, store.t, store.dialect)
        put(store, c, "SUCCESS")
        got = [n.payload for n in listener.notifies(timeout=2, stop_after=1)]
        got += [n.payload for n in listener.notifies(timeout=0.2)]
        assert got == [c]
