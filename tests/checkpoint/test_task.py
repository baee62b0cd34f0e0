"""IterativeTask's loop, in-process, against kombu's in-memory broker.

A run is driven the way the worker drives it (``push_request`` + ``__call__``),
the re-enqueued message is read back from the broker, and its request is fed
to the next run.
"""
from __future__ import annotations

import uuid

import pytest
from celery import Celery
from celery.exceptions import Ignore

import checkpoint
from checkpoint import interruption
from celery_sqlbackend import admin
from checkpoint import CheckpointTableMissingError, CursorNotSerializableError, IterativeTask, MemoryStore, SQLCursorStore
from checkpoint.cursor import HEADER, Progress
from checkpoint.store import NullStore, store_for_app, store_url_for_app


@pytest.fixture
def app():
    app = Celery(f"t{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.task_ignore_result = True
    yield app
    with app.connection_for_write() as conn:
        conn.default_channel.queue_purge("celery")
    app.close()


class StopAfter:
    """An adapter that says stop once ``n`` items have been processed."""

    def __init__(self, n):
        self.n, self.seen = n, 0

    def __call__(self):
        return "test_stop" if self.seen >= self.n else None


def make_task(app, n=10, store=None, **attrs):
    processed, events = [], []

    class Count(IterativeTask):
        name = f"count.{uuid.uuid4().hex[:6]}"
        interruption_adapters = ("test",)
        interruption_backoff = 0
        cursor_store = store if store is not None else MemoryStore()
        checkpoint_every = 3

        def build_enumerator(self, label, *, cursor=None):
            return self.enumerate.integers(0, n, cursor=cursor)

        def each_iteration(self, item, label):
            processed.append(item)
            adapter = interruption._ADAPTERS.get("test")
            if isinstance(adapter, StopAfter):
                adapter.seen += 1

        def on_start(self, label):
            events.append(("start", self.progress.cursor))

        def on_resume(self, label):
            events.append(("resume", self.progress.cursor, self.progress.times_interrupted))

        def on_shutdown(self, label):
            events.append(("shutdown", self.progress.cursor))

        def on_complete(self, label):
            events.append(("complete", self.progress.iterations))
            return {"label": label, "iterations": self.progress.iterations}

    for key, value in attrs.items():
        setattr(Count, key, value)
    task = app.register_task(Count())
    return task, processed, events


def run_once(task, task_id, args, headers=None, retries=0, expires=None):
    """Run like a worker would; return (result, re-enqueued message or None)."""
    task.push_request(id=task_id, args=list(args), kwargs={}, headers=headers or {}, retries=retries,
                      delivery_info={"exchange": "", "routing_key": "celery"}, expires=expires,
                      is_eager=False, **(headers or {}))
    try:
        try:
            return task(*args), None
        except Ignore:
            return None, next_message(task.app)
    finally:
        task.pop_request()


def next_message(app):
    with app.connection_for_read() as conn:
        queue = conn.SimpleQueue("celery")
        message = queue.get(timeout=1)
        message.ack()
        queue.close()
        return message


@pytest.fixture
def adapter():
    yield lambda n: checkpoint.register_adapter("test", StopAfter(n))
    checkpoint.unregister_adapter("test")


def test_interrupted_run_reenqueues_itself_and_the_next_run_resumes(app, adapter):
    task, processed, events = make_task(app)
    task_id = str(uuid.uuid4())
    adapter(4)
    result, message = run_once(task, task_id, ("x",), retries=2, expires="2030-01-01T00:00:00+00:00")
    assert processed == [0, 1, 2, 3]
    headers = message.headers
    assert headers["id"] == task_id and headers["task"] == task.name
    assert headers["retries"] == 2, "an interruption is not a retry"
    assert headers["expires"] is None, "an absolute expiry would revoke an interrupted job"
    args, kwargs, _ = message.decode()
    assert (args, kwargs) == (["x"], {}), "same arguments"
    progress = Progress.from_json(headers[HEADER])
    assert (progress.cursor, progress.iterations, progress.times_interrupted) == (3, 4, 1)
    assert events == [("start", None), ("shutdown", 3)]

    checkpoint.register_adapter("test", lambda: None)
    result, message = run_once(task, task_id, ("x",), headers={HEADER: headers[HEADER]})
    assert message is None
    assert processed == list(range(10)), "every item exactly once"
    assert result == {"label": "x", "iterations": 10}
    assert events[2:] == [("resume", 3, 1), ("shutdown", 9), ("complete", 10)]
    assert task.cursor_store.get(task_id).state == "done", "the checkpoint is kept, marked done, until it expires"


def test_a_job_received_while_the_worker_stops_is_handed_back_unstarted(app):
    task, processed, events = make_task(app, interruption_adapters=("celery",), interruption_backoff=3)
    checkpoint.FLAG.set()
    try:
        _, message = run_once(task, str(uuid.uuid4()), ("x",))
    finally:
        checkpoint.FLAG.clear()
    assert processed == [] and events == [], "no hook ran, no item"
    assert HEADER not in message.headers, "no progress: the next run is the job's first"
    assert message.headers.get("eta"), "handed back with the backoff"


def test_the_flag_stops_the_default_adapter_mid_run(app):
    task, processed, _ = make_task(app, interruption_adapters=("celery",))
    task.each_iteration = lambda item, label: (processed.append(item), checkpoint.FLAG.set() if item == 2 else None)
    try:
        _, message = run_once(task, str(uuid.uuid4()), ("x",))
    finally:
        checkpoint.FLAG.clear()
    assert processed == [0, 1, 2]
    progress = Progress.from_json(message.headers[HEADER])
    assert (progress.cursor, progress.times_interrupted) == (2, 1)


def test_a_stop_after_the_last_item_completes_instead(app, adapter):
    task, processed, events = make_task(app, n=3)
    adapter(3)
    result, message = run_once(task, str(uuid.uuid4()), ("x",))
    assert message is None and processed == [0, 1, 2] and events[-1] == ("complete", 3)


def test_max_job_runtime(app, adapter):
    adapter(10**9)
    task, processed, _ = make_task(app, max_job_runtime=1e-9)
    _, message = run_once(task, str(uuid.uuid4()), ("x",))
    assert len(processed) == 1
    assert Progress.from_json(message.headers[HEADER]).cursor == 0
    assert message.headers.get("eta") is None, "max_job_runtime re-enqueues without delay"


def test_app_wide_max_job_runtime_caps_the_task(app, adapter):
    adapter(10**9)
    app.conf.checkpoint_max_job_runtime = 1e-9
    task, processed, _ = make_task(app, max_job_runtime=3600)
    _, message = run_once(task, str(uuid.uuid4()), ("x",))
    assert message is not None and len(processed) == 1


def test_throttle_reenqueues_with_backoff(app, adapter):
    adapter(10**9)
    task, processed, _ = make_task(app)
    calls = []
    type(task).throttle_on(lambda t: calls.append(t) or len(calls) > 2, backoff=30)
    _, message = run_once(task, str(uuid.uuid4()), ("x",))
    assert processed == [0, 1]
    assert calls[0] is task
    assert message.headers["eta"] is not None
    assert Progress.from_json(message.headers[HEADER]).times_interrupted == 1


def test_a_throttle_declared_in_the_class_body_applies_to_the_class_and_its_subclasses(app, adapter):
    adapter(10**9)
    lag = []

    class Throttled(IterativeTask):
        name = f"throttled.{uuid.uuid4().hex[:6]}"
        interruption_adapters = ("test",)
        cursor_store = MemoryStore()

        def build_enumerator(self, *, cursor=None):
            return self.enumerate.integers(0, 10, cursor=cursor)

        def each_iteration(self, item):
            lag.append(item)

        @checkpoint.throttle_on(backoff=45)
        def replica_lagging(self):
            return len(lag) >= 4

    class Child(Throttled):
        name = f"throttled.child.{uuid.uuid4().hex[:6]}"

    assert IterativeTask._throttles == (), "declaring a throttle must not touch the base class"
    for cls in (Throttled, Child):
        lag.clear()
        _, message = run_once(app.register_task(cls()), str(uuid.uuid4()), ())
        assert lag == [0, 1, 2, 3]
        assert message.headers["eta"] is not None
    with pytest.raises(TypeError, match="parentheses"):
        checkpoint.throttle_on(lambda self: True)


def test_stop_reenqueue_uses_the_interruption_backoff(app, adapter):
    adapter(1)
    task, _, _ = make_task(app, interruption_backoff=3.0)
    _, message = run_once(task, str(uuid.uuid4()), ("x",))
    assert message.headers["eta"] is not None


@pytest.mark.parametrize("store", [NullStore(), MemoryStore()], ids=["no-store", "store"])
def test_unserializable_cursor_is_a_clear_error_at_the_first_checkpoint(app, adapter, store):
    adapter(10**9)
    processed = []

    class Dates(IterativeTask):
        name = "dates"
        interruption_adapters = ("test",)
        cursor_store = store

        def build_enumerator(self, *, cursor=None):
            return iter([("a", (1, 2)), ("b", (3, 4))])

        def each_iteration(self, item):
            processed.append(item)

    task = app.register_task(Dates())
    with pytest.raises(CursorNotSerializableError, match="round trip"):
        run_once(task, "t1", ())
    assert processed == ["a"]


def test_durable_checkpoints_every_n_iterations_and_resume_after_a_crash(app, adapter):
    adapter(10**9)
    store = MemoryStore()
    task, processed, events = make_task(app, store=store, checkpoint_every=3, checkpoint_interval=None)
    saved = []
    original_put = store.put
    store.put = lambda tid, p, **meta: (saved.append((p.iterations, meta["state"])), original_put(tid, p, **meta))

    class Crash(Exception):
        pass

    def crash_at_7(self, item, label):
        if item == 7:
            raise Crash()
        processed.append(item)

    recording = type(task).each_iteration
    type(task).each_iteration = crash_at_7
    task_id = str(uuid.uuid4())
    with pytest.raises(Crash):
        run_once(task, task_id, ("x",))
    assert saved == [(0, "running"), (3, "running"), (6, "running"), (7, "failed")], \
        "at the start, every 3 iterations, and what was done before the exception"
    assert store.get(task_id).cursor == 6

    type(task).each_iteration = recording
    processed.clear()
    result, _ = run_once(task, task_id, ("x",))  # the redelivered message has no header
    assert processed == [7, 8, 9]
    assert ("resume", 6, 0) in events
    assert store.get(task_id).state == "done"


def test_the_newer_of_header_and_store_wins(app, adapter):
    adapter(10**9)
    store = MemoryStore()
    task, processed, _ = make_task(app, store=store)
    task_id = str(uuid.uuid4())
    store.put(task_id, Progress(cursor=5, iterations=6, times_interrupted=1))
    stale_header = Progress(cursor=1, iterations=2, times_interrupted=1).to_json()
    run_once(task, task_id, ("x",), headers={HEADER: stale_header})
    assert processed == [6, 7, 8, 9]


def test_initial_cursor_argument(app, adapter):
    adapter(10**9)
    task, processed, events = make_task(app)
    task.push_request(id="c1", args=["x"], kwargs={"cursor": 7}, headers={}, delivery_info={}, is_eager=False)
    try:
        task("x", cursor=7)
    finally:
        task.pop_request()
    assert processed == [8, 9] and events[0] == ("start", 7)


def test_eager_runs_ignore_interruptions(app, adapter):
    adapter(0)
    task, processed, _ = make_task(app)
    assert task.apply(args=("x",)).get() == {"label": "x", "iterations": 10}
    assert processed == list(range(10))


def test_missing_hooks_are_explained(app):
    class Empty(IterativeTask):
        name = "empty"

    task = app.register_task(Empty())
    with pytest.raises(NotImplementedError, match="build_enumerator"):
        task.apply().get()


# -- the SQL store -------------------------------------------------------------------

def test_sql_store_put_get_update_delete(db_url):
    if not db_url.startswith("sqlite"):
        with pytest.raises(CheckpointTableMissingError, match="sqlq migrate"):
            SQLCursorStore(db_url).get("a")
        admin.migrate(db_url)
    store = SQLCursorStore(db_url)
    assert store.get("a") is None
    store.put("a", Progress(cursor=[1, "k"], iterations=2, times_interrupted=1, total_time=0.5, total=9))
    store.put("a", Progress(cursor=[2, "k"], iterations=3, times_interrupted=1, total_time=0.7, total=9),
              state="interrupted", task_name="t.a")
    assert store.get("a") == Progress(cursor=[2, "k"], iterations=3, times_interrupted=1, total_time=0.7,
                                      total=9, state="interrupted")
    store.put("b", Progress(cursor={"k": [1.5, None]}, iterations=1))
    store.delete("a")
    assert store.get("a") is None
    assert store.get("b").cursor == {"k": [1.5, None]}
    assert store.expire(older_than=3600) == 0
    assert store.expire(older_than=-1) == 1 and store.get("b") is None
    store.dispose()


def test_store_url_follows_the_broker():
    app = Celery("s", broker="sqlq+sqlite:////tmp/jobs.sqlite3", set_as_current=False)
    assert store_url_for_app(app) == "sqlite:////tmp/jobs.sqlite3"
    app.conf.checkpoint_store_url = "sqlite:////tmp/other.sqlite3"
    assert store_url_for_app(app) == "sqlite:////tmp/other.sqlite3"
    redis = Celery("r", broker="redis://localhost", set_as_current=False)
    assert isinstance(store_for_app(redis), NullStore)
    assert isinstance(store_for_app(app), SQLCursorStore)


# -- checkpoint.testing ---------------------------------------------------------------

def test_run_to_completion_interrupts_every_n_items(app):
    from checkpoint.testing import run_to_completion

    task, processed, events = make_task(app, n=10, interruption_adapters=())
    report = run_to_completion(task, "x", stop_every=3)
    assert processed == list(range(10))
    assert report.result == {"label": "x", "iterations": 10}
    assert (report.runs, report.times_interrupted, report.iterations) == (4, 3, 10)
    assert report.cursors == [2, 5, 8]
    assert [e[0] for e in events].count("resume") == 3
    assert task.interruption_adapters == ()
    assert run_to_completion(task, "y").runs == 1


def test_a_copy_of_a_completed_or_revoked_job_does_nothing(app, adapter):
    adapter(10**9)
    task, processed, events = make_task(app, n=5)
    result, _ = run_once(task, "done-1", ("x",))
    assert result["iterations"] == 5 and processed == [0, 1, 2, 3, 4]
    with pytest.raises(Ignore):  # a redelivered copy (visibility timeout, lost ack)
        task.push_request(id="done-1", args=["x"], kwargs={}, headers={}, delivery_info={}, is_eager=False)
        try:
            task("x")
        finally:
            task.pop_request()
    assert processed == [0, 1, 2, 3, 4], "nothing ran twice"
    task.cursor_store.put("revoked-1", Progress(cursor=1, iterations=2), state="revoked")
    with pytest.raises(Ignore):
        task.push_request(id="revoked-1", args=["x"], kwargs={}, headers={}, delivery_info={}, is_eager=False)
        try:
            task("x")
        finally:
            task.pop_request()
    assert len(processed) == 5 and task.cursor_store.get("revoked-1").state == "revoked"


def test_build_enumerator_without_cursor_is_an_error_when_the_class_is_defined():
    with pytest.raises(TypeError, match="must accept a `cursor` keyword"):
        class NoCursor(IterativeTask):
            def build_enumerator(self, account_id):
                return []


def test_items_that_are_not_pairs_are_a_clear_error(app, adapter):
    adapter(10**9)
    task, _, _ = make_task(app)
    type(task).build_enumerator = lambda self, label, *, cursor=None: iter([1, 2])
    with pytest.raises(TypeError, match=r"must yield \(item, cursor\) pairs, got 1"):
        run_once(task, "np-1", ("x",))


def test_default_max_job_runtime_follows_the_visibility_timeout():
    from checkpoint import limits
    redis = Celery("r", broker="redis://localhost:1/0", set_as_current=False)
    redis.conf.broker_transport_options = {"visibility_timeout": 60}
    assert limits.max_job_runtime(redis, None) == 30.0
    assert limits.max_job_runtime(redis, float("inf")) is None
    assert "not below the broker's visibility timeout (60s)" in limits.configuration_warnings(
        redis, [type("T", (), {"name": "t", "max_job_runtime": 90})()])[0]
    sqlq = Celery("s", broker="sqlq+sqlite:///x.db", set_as_current=False)
    assert limits.max_job_runtime(sqlq, None) == limits.DEFAULT_MAX_JOB_RUNTIME
    assert limits.configuration_warnings(sqlq, []) == []
