"""The stop flag, the adapter registry, cursor validation and the Celery wiring, in-process."""
from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import signal

import pytest
from celery import Celery, signals
from celery.worker import WorkController

import checkpoint
from checkpoint import integration, interruption
from checkpoint.cursor import CursorNotSerializableError, Progress, validate_cursor
from checkpoint.interruption import FLAG, StopFlag


@pytest.fixture(autouse=True)
def clear_flag():
    FLAG.clear()
    yield
    FLAG.clear()


# -- cursor -------------------------------------------------------------------

@pytest.mark.parametrize("cursor", [None, 0, 12, "abc", 1.5, True, [1, "a", None], {"a": [1, 2]}, [[1, 2], [3]]])
def test_json_cursors_are_accepted(cursor):
    assert validate_cursor(cursor) == cursor


@pytest.mark.parametrize("cursor, complaint", [
    ((1, 2), "round trip"),
    ({1: "a"}, "round trip"),
    (dt.datetime(2026, 1, 1), "not JSON serializable"),
    ([1, (2, 3)], "round trip"),
    ({"a"}, "not JSON serializable"),
    (float("nan"), "round trip"),
])
def test_cursors_that_change_or_fail_in_json_are_errors(cursor, complaint):
    with pytest.raises(CursorNotSerializableError, match=complaint):
        validate_cursor(cursor)


def test_progress_round_trip_and_newest():
    p = Progress(cursor=[3, "x"], iterations=4, times_interrupted=1, total_time=2.5)
    assert Progress.from_json(p.to_json()) == p
    assert Progress.from_json(None) is None
    older = Progress(cursor=1, iterations=2)
    assert Progress.newest(older, p, None) is p
    assert Progress.newest(None, None) is None


# -- flag -----------------------------------------------------------------------

def test_flag_set_in_the_parent_is_seen_by_a_forked_child_and_back():
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: wait for the parent's set, then set a second byte of evidence
        try:
            os.close(write)
            os.read(read, 1)
            os._exit(0 if FLAG.is_set() else 1)
        finally:
            os._exit(2)
    os.close(read)
    FLAG.set()
    os.write(write, b"x")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _child_reports_flag(queue):
    from checkpoint.interruption import FLAG as child_flag  # re-imported in the spawned child
    queue.put((child_flag.attached, child_flag.is_set()))
    child_flag.clear()


def test_a_spawned_child_attaches_to_the_published_flag(monkeypatch):
    monkeypatch.delenv(interruption.ENV_VAR, raising=False)
    FLAG.publish()
    FLAG.set()
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_reports_flag, args=(queue,))
    child.start()
    assert queue.get(timeout=30) == (True, True)
    child.join(30)
    assert not FLAG.is_set(), "the child cleared the shared byte"


def test_an_unrelated_process_does_not_attach(monkeypatch):
    published = StopFlag()
    published.publish()
    monkeypatch.setenv(interruption.ENV_VAR, f"{os.getpid() + 999999}:{published.path}")
    own = StopFlag.for_this_process()
    assert not own.attached and own.path is None, "a forking worker's flag needs no file"
    published._remove_if_owner()
    assert not os.path.exists(published.path)


def test_flag_set_from_a_signal_handler():
    previous = signal.signal(signal.SIGUSR2, lambda *_: FLAG.set())
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert checkpoint.stopping()
    finally:
        signal.signal(signal.SIGUSR2, previous)


# -- registry -------------------------------------------------------------------

def test_registry():
    assert "celery" in interruption.registered()
    assert checkpoint.lookup_adapter("celery")() is None
    FLAG.set()
    assert checkpoint.lookup_adapter("celery")() == "worker_stopping"
    checkpoint.register_adapter("deploy", lambda: "deploying")
    try:
        assert checkpoint.lookup_adapter("deploy")() == "deploying"
    finally:
        checkpoint.unregister_adapter("deploy")
    with pytest.raises(interruption.UnknownAdapterError, match="deploy"):
        checkpoint.lookup_adapter("deploy")
    with pytest.raises(TypeError):
        checkpoint.register_adapter("bad", "not callable")


# -- Celery wiring ------------------------------------------------------------------

def test_celery_still_has_the_soft_shutdown_wait_we_wrap():
    # CELERY-NOTES §7: the soft-shutdown hook relies on this method; fail loudly if Celery renames it.
    assert callable(getattr(WorkController, "wait_for_soft_shutdown", None))


def test_install_is_idempotent_and_adds_the_bootstep():
    app = Celery("wiring", broker="memory://", set_as_current=False)
    checkpoint.install(app)
    checkpoint.install(app)
    assert integration.StopFlagStep in app.steps["worker"]
    assert integration.is_installed(app)


def test_registering_an_iterative_task_installs_the_wiring():
    app = Celery("wiring2", broker="memory://", set_as_current=False)

    class Job(checkpoint.IterativeTask):
        name = "wiring2.job"

    app.register_task(Job())
    assert integration.is_installed(app)


class _FakeWorker:
    """Only what the bootstep touches: the pool start method and a soft-shutdown method to wrap."""

    def __init__(self, pool_start_method="fork"):
        self.pool_start_method = pool_start_method
        self.flag_at_soft_wait = None

    def wait_for_soft_shutdown(self):
        self.flag_at_soft_wait = FLAG.is_set()


def test_bootstep_wraps_soft_shutdown_and_sets_the_flag_on_close():
    FLAG.set()
    worker = _FakeWorker()
    step = integration.StopFlagStep(worker)
    assert not FLAG.is_set(), "a starting worker clears the flag"
    worker.wait_for_soft_shutdown()
    assert worker.flag_at_soft_wait is True, "the flag must be set before Celery's soft wait"
    FLAG.clear()
    step.close(worker)
    assert FLAG.is_set()
    integration.StopFlagStep(worker)  # a second wrap does not stack
    assert worker.wait_for_soft_shutdown.__closure__ is not None


def test_a_spawning_worker_publishes_the_flag_file(monkeypatch):
    monkeypatch.delenv(interruption.ENV_VAR, raising=False)
    integration.StopFlagStep(_FakeWorker("spawn"))
    assert FLAG.path and os.environ[interruption.ENV_VAR] == f"{os.getpid()}:{FLAG.path}"
    FLAG.set()
    assert StopFlag(FLAG.path).is_set(), "the file holds the very byte the flag uses"


def test_worker_shutting_down_sets_the_flag():
    integration.install(Celery("wiring3", broker="memory://", set_as_current=False))
    signals.worker_shutting_down.send(sender="w@h", sig="SIGTERM", how="Warm", exitcode=0)
    assert FLAG.is_set()
