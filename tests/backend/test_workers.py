"""The result backend end to end: real prefork ``celery worker`` processes, SQLite and PostgreSQL.

One worker per database per module (starting workers is the slow part);
every wait is a poll with a deadline.
"""
from __future__ import annotations

import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from celery import chain, chord, group, states
from celery.exceptions import ChordError
from celery.result import GroupResult
from kombu.exceptions import EncodeError
from sqlalchemy import event, create_engine, text

from celery_sqlbackend.store import utcnow

from .beapp import make_app
from tests.harness import CeleryWorker, wait_until

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def stack(backend_db, tmp_path_factory):
    kind, url = backend_db
    app = make_app(url)
    worker = CeleryWorker(tmp_path_factory.mktemp("beworker"), app="beapp", app_dir=HERE, concurrency=2,
                          hostname=f"be{time.monotonic_ns()}@%h", extra_args=["--without-heartbeat"],
                          env={"BE_DB": url})
    try:
        worker.wait_ready(60)
        yield kind, url, app, worker
    finally:
        worker.close()


def sig(app, name, *args, **options):
    return app.signature(f"beapp.{name}", args=args, **options)


def test_success(stack):
    kind, url, app, worker = stack
    r = sig(app, "add", 2, 3).delay()
    assert r.get(timeout=20) == 5
    assert r.state == states.SUCCESS and r.successful() and r.ready()
    assert r.date_done is not None


def test_failure_reraises_with_traceback(stack):
    kind, url, app, worker = stack
    r = sig(app, "fail", "it broke").delay()
    with pytest.raises(Exception) as info:
        r.get(timeout=20)
    assert type(info.value).__name__ == "Boom"
    assert "it broke" in str(info.value)
    assert r.state == states.FAILURE and r.failed()
    assert "raise Boom(message)" in r.traceback
    # propagate=False hands the exception back instead
    assert type(r.get(timeout=5, propagate=False)).__name__ == "Boom"


def test_started_then_success(stack, tmp_path):
    kind, url, app, worker = stack
    gate = tmp_path / "gate"
    r = sig(app, "wait_for_gate", str(gate)).delay()
    wait_until(lambda: r.state == states.STARTED, 20, message="STARTED")
    assert r.info["pid"] > 0 and r.info["hostname"]
    assert not r.ready()
    gate.write_text("go")
    assert r.get(timeout=20) == "opened"


def test_retry_state(stack):
    kind, url, app, worker = stack
    r = sig(app, "retry_later").delay()
    wait_until(lambda: r.state == states.RETRY, 20, message="RETRY")
    assert not r.ready()
    assert isinstance(r.info, ValueError) and "try again in an hour" in str(r.info)


def test_revoked(stack):
    kind, url, app, worker = stack
    r = sig(app, "add", 1, 1).apply_async(countdown=2)
    app.control.revoke(r.id)
    with pytest.raises(Exception) as info:
        r.get(timeout=30)
    assert type(info.value).__name__ == "TaskRevokedError"
    assert r.state == states.REVOKED


def test_unserializable_result_is_a_failure_that_says_why(stack):
    kind, url, app, worker = stack
    r = sig(app, "unserializable").delay()
    with pytest.raises(EncodeError) as info:
        r.get(timeout=20)
    assert "cannot be stored" in str(info.value) and "json" in str(info.value)
    assert r.state == states.FAILURE
    # and the worker went on
    assert sig(app, "add", 1, 2).delay().get(timeout=20) == 3


def test_result_extended(stack):
    kind, url, app, worker = stack
    r = app.signature("beapp.add", args=(4,), kwargs={"y": 5}).delay()
    assert r.get(timeout=20) == 9
    r = app.AsyncResult(r.id)   # fresh, nothing cached
    assert r.name == "beapp.add"
    assert r.args == [4] and r.kwargs == {"y": 5}
    assert r.worker.startswith("be")
    assert r.retries == 0
    assert r.queue == "celery"


def test_result_ties_to_job(stack):
    kind, url, app, worker = stack
    r = sig(app, "add", 20, 22).delay()
    assert r.get(timeout=20) == 42
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            job_id = conn.execute(text("SELECT id FROM sqlq_jobs WHERE task_id = :t"), {"t": r.id}).scalar()
    finally:
        engine.dispose()
    assert job_id is not None, "finished jobs are kept (keep_finished > 0 by default)"
    meta = app.backend.result_for_job(job_id)
    assert meta["status"] == states.SUCCESS and meta["result"] == 42


def test_forget(stack):
    kind, url, app, worker = stack
    r = sig(app, "add", 1, 2).delay()
    assert r.get(timeout=20) == 3
    r.forget()
    assert app.AsyncResult(r.id).state == states.PENDING
    assert not app.backend.task_result_exists(r.id)


def test_group_and_save_restore(stack):
    kind, url, app, worker = stack
    res = group(sig(app, "add", i, i) for i in range(100)).delay()
    assert res.get(timeout=60) == [2 * i for i in range(100)]
    res.save()
    restored = GroupResult.restore(res.id, app=app)
    assert [r.id for r in restored.results] == [r.id for r in res.results]
    assert restored.join_native(timeout=5) == [2 * i for i in range(100)]
    restored.delete()
    assert GroupResult.restore(res.id, app=app) is None


def test_chain(stack):
    kind, url, app, worker = stack
    res = chain(sig(app, "add", 1, 2), sig(app, "add", 3), sig(app, "add", 4)).delay()
    assert res.get(timeout=30) == 10
    assert res.parent.get(timeout=5) == 6


def _body_runs(url, tag):
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            # (beapp creates the table on the first body run; a test may look before any body ran.)
            conn.execute(text("CREATE TABLE IF NOT EXISTS be_body_runs (tag VARCHAR(64), total INTEGER)"))
        with engine.connect() as conn:
            return conn.execute(text("SELECT count(*), max(total) FROM be_body_runs WHERE tag = :t"),
                                {"t": tag}).one()
    finally:
        engine.dispose()


def test_chord_small(stack):
    kind, url, app, worker = stack
    tag = uuid.uuid4().hex
    res = chord(sig(app, "add", i, 1) for i in range(10))(sig(app, "record_body", tag))
    assert res.get(timeout=30) == sum(i + 1 for i in range(10))
    assert _body_runs(url, tag) == (1, 55)


def test_chord_of_1000_runs_its_body_once(stack):
    kind, url, app, worker = stack
    tag = uuid.uuid4().hex
    t0 = time.monotonic()
    res = chord(sig(app, "add", i, i) for i in range(1000))(sig(app, "record_body", tag))
    assert res.get(timeout=240) == sum(2 * i for i in range(1000))
    elapsed = time.monotonic() - t0
    # The body sent once: wait a moment of polling for a (wrong) second run to show up.
    count, total = _body_runs(url, tag)
    assert (count, total) == (1, 999000)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            row = conn.execute(text("SELECT size, done, fired FROM sqlq_chords WHERE group_id = :g"),
                               {"g": res.parent.id}).one()
    finally:
        engine.dispose()
    assert row[0] == 1000 and row[1] == 1000 and row[2]
    print(f"\n[{kind}] chord of 1000: {elapsed:.2f}s end to end")


def test_chord_error_propagates(stack):
    kind, url, app, worker = stack
    tag = uuid.uuid4().hex
    res = chord([sig(app, "add", 1, 1), sig(app, "fail", "header broke"), sig(app, "add", 2, 2)])(
        sig(app, "record_body", tag))
    # get() re-raises the failed header task first (Celery's documented order) ...
    with pytest.raises(Exception, match="header broke"):
        res.get(timeout=30)
    # ... and the body itself failed with a ChordError naming the culprit.
    err = res.get(timeout=30, propagate=False)
    assert isinstance(err, ChordError)
    assert "Dependency" in str(err) and "header broke" in str(err)
    assert res.state == states.FAILURE
    assert _body_runs(url, tag)[0] == 0


def test_expiry_cleanup(stack):
    kind, url, app, worker = stack
    rs = [sig(app, "add", i, 0).delay() for i in range(5)]
    assert [r.get(timeout=20) for r in rs] == list(range(5))
    backend = app.backend
    # Nothing is old enough yet.
    app.send_task("celery.backend_cleanup").get(timeout=20)
    assert all(backend.task_result_exists(r.id) for r in rs)
    # An hour and a bit later, everything written up to now is gone (in batches).
    backend.cleanup_batch_size = 2
    counts = backend.cleanup(now=utcnow() + timedelta(seconds=backend.expires + 60))
    assert counts["results"] >= 5
    assert not any(backend.task_result_exists(r.id) for r in rs)
    assert app.AsyncResult(rs[0].id).state == states.PENDING


def test_collect_group_of_1000(stack):
    """How long ``group.get()`` takes for 1,000 results that are already stored, and live."""
    kind, url, app, worker = stack
    res = group(sig(app, "add", i, 1) for i in range(1000)).delay()
    t0 = time.monotonic()
    assert res.get(timeout=240) == [i + 1 for i in range(1000)]
    live = time.monotonic() - t0
    fresh = app.GroupResult(res.id, [app.AsyncResult(r.id) for r in res.results])
    app.backend._cache.clear()
    statements = []
    engine = app.backend.store.engine

    def count(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        t0 = time.monotonic()
        assert fresh.get(timeout=30) == [i + 1 for i in range(1000)]
        stored = time.monotonic() - t0
    finally:
        event.remove(engine, "before_cursor_execute", count)
    print(f"\n[{kind}] group of 1000: waited {live:.2f}s while running; collected stored results in "
          f"{stored * 1000:.0f} ms with {len(statements)} statements")
    # Stored results are fetched in one query per round (a few rounds at most), not one per result.
    assert 1 <= len(statements) <= 10, statements[:12]


def test_nested_canvases(stack):
    """Groups and chains inside chord headers, a chord inside a chain, a group as chord body."""
    kind, url, app, worker = stack
    add = lambda *a: sig(app, "add", *a)  # noqa: E731
    tsum = sig(app, "tsum")
    # a group nested in the header counts as its parts
    assert chord([group(add(1, 1), add(2, 2)), add(3, 3)], tsum).delay().get(timeout=30) == 12
    # a chain in the header contributes its last result
    assert chord([chain(add(1, 1), add(10)), add(2, 2)], tsum).delay().get(timeout=30) == 16
    # a chord in the middle of a chain
    res = chain(add(1, 1), chord([add(1), add(2)], tsum), add(100)).delay()
    assert res.get(timeout=30) == 107
    # a group as the chord body
    res = chord([add(1, 1), add(2, 2)], group(tsum, tsum)).delay()
    assert res.get(timeout=30) == [6, 6]
