"""The worker lifecycle, in the order it runs.

    1. register        ``worker_init`` (MainProcess, before the pool forks):
                       hand the transport its ``WorkerHooks``, insert the
                       process row, sweep orphaned claims, prune the dead,
                       start the heartbeat thread.
    2. heartbeat       every ``heartbeat_interval`` on that thread, with its
                       own short transactions, whatever the pool is doing.
    3. drain           warm shutdown: Celery stops claiming (every claim
                       round stops once ``WorkerHooks.stopping``), closes the
                       channel (claimed but undelivered jobs go back to ready
                       in place; unacked deliveries keep their claims, since
                       the pool may have started them: see
                       ``Channel._restore``), and waits for running tasks,
                       which pool processes now finish themselves
                       (``stopping_pool``: Celery drops some of their acks).
                       Heartbeats go on all the while.
    4. stop heartbeat  ``worker_shutdown``, which Celery sends only after the
                       pool has joined: finish what completed, then stop beating.
    5. deregister      same signal: release what never started, fail any
                       started claim still held (a cold shutdown killed its
                       task), delete the row.
                       Celery sends no ``worker_shutdown`` after a cold
                       shutdown, so steps 4-5 also run at interpreter exit.

Celery's own event heartbeat is not used for liveness: it stops at the start
of a warm shutdown, while tasks still run (the Solid Queue #568 failure).
"""
from __future__ import annotations

import atexit
import logging
import threading

from celery import current_app, signals
from celery._state import connect_on_app_finalize
from kombu.serialization import prepare_accept_content

from . import config_check, eventloop, failure_results, stale_deliveries, stopping_pool, task_failures
from .options import Options, from_celery_conf
from .processes import LocalProcess, local_process
from .store import store_for
from .urls import broker_database_url
from .worker_hooks import WorkerHooks

log = logging.getLogger("celery_sqlbackend.lifecycle")

_connected = False
_worker = None   # the WorkController of this process, once worker_init has run
#: Set by our wrapper of Celery's SIGQUIT handler, before that handler cancels the running tasks.
_cold_shutdown = threading.Event()


def connect_signals() -> None:
    global _connected
    if _connected:
        return
    _connected = True
    signals.celeryd_init.connect(on_celeryd_init, weak=False, dispatch_uid="sqlq.celeryd_init")
    signals.worker_init.connect(on_worker_init, weak=False, dispatch_uid="sqlq.worker_init")
    signals.celeryd_after_setup.connect(on_after_setup, weak=False, dispatch_uid="sqlq.celeryd_after_setup")
    signals.worker_shutdown.connect(on_worker_shutdown, weak=False, dispatch_uid="sqlq.worker_shutdown")
    signals.task_failure.connect(on_task_failure, weak=False, dispatch_uid="sqlq.task_failure")
    signals.worker_shutting_down.connect(on_shutting_down, weak=False, dispatch_uid="sqlq.worker_shutting_down")
    signals.task_postrun.connect(on_task_postrun, weak=False, dispatch_uid="sqlq.task_postrun")
    signals.worker_ready.connect(on_worker_ready, weak=False, dispatch_uid="sqlq.worker_ready")
    signals.worker_process_init.connect(on_pool_process_init, weak=False, dispatch_uid="sqlq.worker_process_init")
    # A producer sends no worker signal: its app is checked when it is finalized (the first task call).
    connect_on_app_finalize(on_app_finalize)


def on_app_finalize(app) -> None:
    """A producer's first task call: a broken sqlq configuration fails here, saying what to write."""
    config_check.check(app.conf)


def broker_store(app):
    """The Store behind ``app``'s broker, or None if the broker is not ours."""
    url = broker_database_url(app.conf)
    if url is None:
        return None
    return store_for(url, Options.from_mapping(from_celery_conf(app.conf)))


def worker_process(app) -> LocalProcess | None:
    store = broker_store(app)
    return local_process(store) if store is not None else None


def on_celeryd_init(sender=None, conf=None, **_):
    """Step 0: before the worker connects, stop on a broken configuration (``config_check``: Celery
    would log an exception raised here and go on, so this exits), then fold ``sqlq_*`` settings into
    the transport options."""
    found = config_check.problems(conf) if conf is not None else []
    if found:
        raise SystemExit("celery_sqlbackend configuration error:\n  " + "\n  ".join(found))
    if conf is not None and broker_database_url(conf) is not None:
        conf.broker_transport_options = from_celery_conf(conf)


def on_worker_init(sender=None, **_):
    """Step 1: register and start heartbeating."""
    worker = sender
    proc = worker_process(worker.app)
    if proc is None:
        return
    pool = getattr(worker.pool_cls, "__module__", "").rsplit(".", 1)[-1] or None
    queues = list(worker.app.amqp.queues.consume_from or worker.app.amqp.queues)
    # ``-c auto`` is resolved only after this signal: the integer is recorded by ``on_after_setup``.
    concurrency = worker.concurrency if isinstance(worker.concurrency, int) else None
    proc.describe(kind="worker", name=worker.hostname, pool=pool, concurrency=concurrency, queues=queues)
    # What the transport's channels need to know about this worker (``worker_hooks``).
    proc.attach_worker(WorkerHooks(running_tags=running_tags, stopping=worker_stopping,
                                   terminating=worker_terminating,
                                   accept=prepare_accept_content(worker.app.conf.accept_content)))
    # Jobs the store fails in this process (pruned, undecodable, ...) reach their results.
    proc.report_failed = failure_results.reporter(worker.app, proc.store)
    global _worker
    _worker = worker
    atexit.register(on_worker_shutdown, sender=worker)
    stopping_pool.arm()
    proc.register()


def on_after_setup(sender=None, instance=None, **_):
    """Step 1b: the worker is set up (``-c auto`` resolved); record its concurrency if it was not known."""
    worker = instance
    if worker is None or not isinstance(worker.concurrency, int):
        return
    proc = worker_process(worker.app)
    if proc is not None and proc.id is not None and proc.concurrency != worker.concurrency:
        proc.set_concurrency(worker.concurrency)


def on_pool_process_init(**_):
    """A prefork pool process starts: it will not start a delivery whose claim was taken back
    (``stale_deliveries``)."""
    app = current_app._get_current_object()
    if broker_database_url(app.conf) is not None:
        options = Options.from_mapping(from_celery_conf(app.conf))
        if options.check_stale_deliveries:
            stale_deliveries.guard_tracers(app, options.alive_threshold, lambda: broker_store(app))


def on_task_failure(sender=None, task_id=None, exception=None, einfo=None, **_):
    """A task raised with no retries left (in the process that ran it): keep its job as failed."""
    if sender is None or exception is None or task_failures.delivered_claim(sender.request) is None:
        return
    store = broker_store(sender.app)
    if store is not None:
        task_failures.record(store, sender, task_id, exception, einfo)


def on_shutting_down(sender=None, **_):
    """Step 3 begins (SIGTERM, SIGINT): pool processes finish their own tasks' jobs from now on, since
    Celery may drop the acks of jobs it already handed them (``stopping_pool``); an idle event loop
    wakes at once to see the stop (``eventloop.wake_hubs``)."""
    stopping_pool.mark_stopping()
    eventloop.wake_hubs()


def on_task_postrun(sender=None, task_id=None, state=None, **_):
    """A task ended in a pool process of a stopping worker: record its job finished (``stopping_pool``)."""
    if sender is None or not stopping_pool.stopping():
        return
    store = broker_store(sender.app)
    if store is not None:
        stopping_pool.finish_in_pool(store, sender, task_id, state)


def on_worker_ready(sender=None, **_):
    """Know that a cold shutdown began before Celery's SIGQUIT handler kills the running tasks.

    Celery's handler cancels the running tasks (they leave ``active_requests``)
    and only then sets ``state.should_terminate``; on Celery 5.5 the pool is
    stopped in between.  A claim thread looking in that window would take the
    killed tasks for finished ones.  Our wrapper sets a flag first, then runs
    Celery's handler.  With ``worker_soft_shutdown_timeout`` set, tasks may
    still finish normally during the soft wait, so there Celery's own flag rules.
    """
    from celery import platforms
    app = getattr(sender, "app", None)
    if app is None or broker_database_url(app.conf) is None or not platforms.signals.supported("SIGQUIT"):
        return
    if (app.conf.get("worker_soft_shutdown_timeout") or 0) > 0:
        return
    celery_handler = platforms.signals["SIGQUIT"]
    if not callable(celery_handler) or getattr(celery_handler, "sqlq_wrapped", False):
        return

    def on_sigquit(*args):
        _cold_shutdown.set()
        return celery_handler(*args)

    on_sigquit.sqlq_wrapped = True
    platforms.signals["SIGQUIT"] = on_sigquit


def running_tags() -> set[str]:
    """Delivery tags of the Celery requests executing now."""
    from celery.worker import state
    return {request.message.delivery_tag for request in list(state.active_requests)
            if getattr(request, "message", None) is not None}


def worker_stopping() -> bool:
    """True once Celery is shutting the worker down (not merely reconnecting)."""
    from celery import bootsteps
    from celery.worker import state
    if _worker is not None and getattr(_worker.blueprint, "state", None) in (bootsteps.CLOSE, bootsteps.TERMINATE):
        return True   # includes `celery control shutdown`, which sets no flag in state
    return bool(state.should_stop is not None and state.should_stop is not False
                or state.should_terminate is not None and state.should_terminate is not False)


def worker_terminating() -> bool:
    """True in a cold shutdown (SIGQUIT, a second Ctrl-C): Celery kills running tasks."""
    from celery.worker import state
    if _cold_shutdown.is_set():
        return True
    return state.should_terminate is not None and state.should_terminate is not False


def on_worker_shutdown(sender=None, **_):
    """Steps 4 and 5: the pool has drained; stop beating and leave."""
    proc = worker_process(sender.app)
    if proc is None or proc.id is None:
        return
    if not worker_terminating():             # (a cold shutdown killed, not finished, them)
        proc.acks.finish_completed(running_tags())   # queue finishes of the drained jobs...
    proc.stop()                              # ...stop beating only now...
    if getattr(sender, "exitcode", None) not in (None, 0):
        # "Unrecoverable error": what it held goes back counted, so a crash loop ends in failed.
        proc.deregister(reason="WorkerCrashedError: the worker exited with an unrecoverable error "
                               f"(exit code {sender.exitcode}) while holding the job", crashed=True)
        return
    proc.deregister(                         # ...write them, give back leftovers, delete the row
        reason="WorkerShutdownError: the worker shut down (cold) while the job was running")
