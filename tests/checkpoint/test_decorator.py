"""``@iterative_task`` (app.task and shared_task forms) and run_to_completion's simulated crashes and retries."""
from __future__ import annotations

import uuid

import pytest
from celery import Celery

import checkpoint
from checkpoint import IterativeTask, MemoryStore, iterative_task
from checkpoint.testing import run_to_completion


def _integers(task, n, *, cursor=None):
    return task.enumerate.integers(0, n, cursor=cursor)


@pytest.fixture
def app():
    app = Celery(f"d{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.task_ignore_result = True
    yield app
    app.close()


def test_a_decorated_function_is_an_iterative_task_that_resumes(app):
    seen, events = [], []

    @iterative_task(app=app, enumerator=_integers, checkpoint_every=5, cursor_store=MemoryStore(),
                    on_start=lambda task, n: events.append("start"),
                    on_resume=lambda task, n: events.append(("resume", task.progress.cursor)),
                    on_complete=lambda task, n: {"n": n, "iterations": task.progress.iterations})
    def count(item, n):
        """Counts."""
        seen.append(item)

    assert isinstance(count._get_current_object(), IterativeTask)
    assert count.name == f"{__name__}.count" and count.acks_late and count.reject_on_worker_lost
    assert count.__doc__ == "Counts."
    report = run_to_completion(count, 20, stop_every=7)
    assert report.result == {"n": 20, "iterations": 20} and report.times_interrupted == 2
    assert seen == list(range(20))
    assert events == ["start", ("resume", 6), ("resume", 13)]


def test_shared_task_form_registers_on_every_app(app):
    name = f"shared.count.{uuid.uuid4().hex[:6]}"

    @iterative_task(enumerator=_integers, name=name)
    def count(item, n):
        pass

    assert name in app.tasks, "a shared task is registered on apps created before it"
    later = Celery("later", broker="memory://", set_as_current=False)
    try:
        assert isinstance(later.tasks[name], IterativeTask)
    finally:
        later.close()


def test_an_enumerator_without_cursor_is_an_error_at_decoration():
    with pytest.raises(TypeError, match="must accept a `cursor` keyword argument"):
        iterative_task(enumerator=lambda task, n: range(n))
    with pytest.raises(TypeError, match="IterativeTask subclass"):
        iterative_task(enumerator=_integers, base=object)


def test_a_simulated_crash_resumes_from_the_last_durable_checkpoint(app):
    seen = []

    @iterative_task(app=app, enumerator=_integers, name=f"count.{uuid.uuid4().hex[:6]}", checkpoint_every=5,
                    cursor_store=MemoryStore())
    def count(item, n):
        seen.append(item)

    report = run_to_completion(count, 20, crash_at=[13])
    assert report.crashes == 1 and report.runs == 2 and report.iterations == 20
    # Saved at 5 and 10 items: items 10..12 run twice, as after a SIGKILL.
    assert seen == list(range(13)) + list(range(10, 20))


def test_a_simulated_crash_without_a_durable_store_starts_over(app):
    seen = []

    @iterative_task(app=app, enumerator=_integers, name=f"count.{uuid.uuid4().hex[:6]}")
    def count(item, n):
        seen.append(item)

    report = run_to_completion(count, 8, crash_at=[5])
    assert report.crashes == 1 and seen == list(range(5)) + list(range(8))


def test_a_simulated_failure_retries_at_the_item_that_failed(app):
    seen, events = [], []

    @iterative_task(app=app, enumerator=_integers, name=f"count.{uuid.uuid4().hex[:6]}", checkpoint_every=100,
                    cursor_store=MemoryStore(),
                    on_start=lambda task, n: events.append(("start", task.request.retries)),
                    on_resume=lambda task, n: events.append(("resume", task.progress.cursor, task.request.retries)))
    def count(item, n):
        seen.append(item)

    report = run_to_completion(count, 12, retry_at=[4, 9])
    assert report.retries == 2 and seen == list(range(12))
    assert events == [("start", 0), ("resume", 3, 1), ("resume", 8, 2)]


def test_class_tasks_get_the_crash_and_retry_helpers_too(app):
    seen = []

    class Count(IterativeTask):
        name = f"count.{uuid.uuid4().hex[:6]}"
        cursor_store = MemoryStore()
        checkpoint_every = 3

        def build_enumerator(self, n, *, cursor=None):
            return self.enumerate.integers(0, n, cursor=cursor)

        def each_iteration(self, item, n):
            seen.append(item)

    task = app.register_task(Count())
    report = run_to_completion(task, 10, stop_every=4, crash_at=[6], retry_at=[8])
    assert (report.crashes, report.retries, report.times_interrupted, report.iterations) == (1, 1, 1, 10)
    # Stopped after 4 (saved), crashed before 6 (not saved since): 4 and 5 run twice; the retry resumes at 8.
    assert seen == [0, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9]
    assert checkpoint.testing.ADAPTER not in checkpoint.interruption.registered()
