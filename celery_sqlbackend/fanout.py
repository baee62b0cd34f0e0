"""Exchanges whose bindings live in the database: broadcasts, events and replies.

kombu's virtual transports keep the exchange routing table in the memory of
one connection.  That is enough for task queues (every producer declares the
queue it publishes to), but not for what Celery's remote control and
monitoring need, where the queue is declared by one process and the message
is published by another:

=====================  ========  ===============================================
exchange               type      who binds / who publishes
=====================  ========  ===============================================
``celery.pidbox``      fanout    each worker binds ``<node>.celery.pidbox``;
                                 ``celery inspect|control`` publishes
``reply.celery.pidbox``  direct  the ``inspect`` client binds ``<oid>.reply…``;
                                 every worker publishes its reply
``celeryev``           topic     ``celery events`` / Flower bind
                                 ``celeryev.<uuid>``; workers publish
=====================  ========  ===============================================

So every binding of a named exchange is also written to the ``bindings``
table, and routing consults it: fanout always (a copy per bound queue), topic
always (merged with the local table), direct only when the local table has no
queue for the routing key (a reply to a queue declared elsewhere).  A message
no queue is bound for is dropped, as AMQP drops unroutable messages.

Nothing here may pile up when its reader goes away:

* A queue declared with ``expires`` (``x-expires``; Celery sets it on pidbox,
  reply and event queues) is *transient*: its bindings carry ``expires_at``,
  which the consumer pushes forward while it polls (at most every quarter of
  the expiry).  ``maintain`` deletes bindings whose reader stopped polling
  and the messages left in their queues.  A live consumer whose binding was
  removed (it was blocked longer than the expiry) binds again on its next poll.
* An ``auto_delete`` queue is deleted (unbound and purged) when its last
  consumer is cancelled, e.g. when ``celery events`` exits or a worker stops.
* Messages waiting in transient queues are deleted by ``maintain`` once past
  their ``expiration`` property, once older than ``TRANSIENT_MAX_AGE``, and
  beyond the newest ``TRANSIENT_MAX_BACKLOG`` per queue.

``maintain`` runs with the rest of the periodic maintenance (the worker's
maintenance thread, after each heartbeat) and from ``celery sqlq prune``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from time import monotonic
from typing import Any, Callable, Iterable

from . import publishing
from .store import Store, utcnow
from .store import bindings as bindings_table

log = logging.getLogger("celery_sqlbackend.fanout")

#: Messages older than this are dropped from transient queues (Celery's own
#: default ``control_queue_ttl`` is 300 s; events are useless much sooner).
TRANSIENT_MAX_AGE = 300.0

#: At most this many waiting messages are kept per transient queue; older ones
#: beyond it are dropped first.
TRANSIENT_MAX_BACKLOG = 10_000


@dataclass
class _QueueInfo:
    expires: float | None = None        # seconds, from x-expires
    auto_delete: bool = False
    last_touch: float = 0.0


@dataclass
class ChannelBindings:
    """What one channel declared, to refresh and re-create its bindings."""
    queues: dict[str, _QueueInfo] = field(default_factory=dict)


def _state(channel) -> ChannelBindings:
    return channel.bindings   # (``transport.Channel.bindings``)


# --------------------------------------------------------------------------- channel hooks

def declared(channel, queue: str, kwargs: dict[str, Any]) -> None:
    """``_new_queue``: remember a queue's expiry and auto-delete flag."""
    arguments = kwargs.get("arguments") or {}
    expires = arguments.get("x-expires")
    info = _state(channel).queues.setdefault(queue, _QueueInfo())
    info.expires = float(expires) / 1000.0 if expires else None
    info.auto_delete = bool(kwargs.get("auto_delete"))
    if info.expires:
        info.last_touch = monotonic()  # ``bind`` sets the first expiry


def bind(channel, exchange: str, queue: str, routing_key: str = "") -> None:
    """``_queue_bind``: record the binding of a named exchange in the database."""
    if not exchange:
        return
    info = _state(channel).queues.get(queue)
    expires = info.expires if info else None
    store = channel.store
    expires_at = utcnow() + timedelta(seconds=expires) if expires else None
    caller = publishing.caller_connection(store)   # declared by a publish inside enqueue_in: its transaction
    if caller is not None:
        bindings_table.bind(caller, store.t, exchange=exchange, queue=queue, routing_key=routing_key or "",
                            expires_at=expires_at)
        return
    store.bindings.bind(exchange=exchange, queue=queue, routing_key=routing_key or "", expires_at=expires_at)


def lookup(channel, exchange: str, routing_key: str, local: Iterable[str]) -> list[str]:
    """Queues for a publish to ``exchange``: the local table, completed from the database."""
    local = [q for q in local if q]
    kind = channel.typeof(exchange)
    if kind.type == "direct" and local:
        return local
    rows = bindings(channel.store, exchange)
    if not rows:
        return local
    table = [kind.prepare_bind(queue, exchange, rkey, None) for queue, rkey in rows]
    found = set(local) | set(kind.lookup(table, exchange, routing_key, None))
    return sorted(found)


def touch(channel, queues: Iterable[str]) -> None:
    """Before a poll: keep the bindings of transient queues we consume alive."""
    state = _state(channel)
    now = monotonic()
    due: dict[float, list[str]] = {}
    for queue in queues:
        info = state.queues.get(queue)
        if info is None or not info.expires or now - info.last_touch < info.expires / 4:
            continue
        info.last_touch = now
        due.setdefault(info.expires, []).append(queue)
    for expires, names in due.items():
        try:
            found = touch_queues(channel.store, names, expires)
        except Exception as exc:  # a poll must not fail because a refresh did
            log.warning("could not refresh the expiry of %s (%s)", names, exc)
            continue
        for queue in set(names) - found:
            # Removed while we were blocked (a long task under --pool solo):
            # we are alive and consuming, so the queue is ours again.
            log.info("binding of transient queue %s had expired while its consumer was busy; "
                     "binding it again", queue)
            for exchange, rkey, _args in channel.state.queue_bindings(queue):
                bind(channel, exchange, queue, rkey)


def cancelled(channel, queue: str | None) -> None:
    """After ``basic_cancel``: delete an auto-delete queue nobody consumes any more."""
    if queue is None:
        return
    info = _state(channel).queues.get(queue)
    if info is None or not info.auto_delete or queue in channel._active_queues:
        return
    try:
        channel.queue_delete(queue)
    except Exception as exc:
        log.warning("could not delete auto-delete queue %s (%s); it will expire", queue, exc)


def expiry_of(message: dict) -> datetime | None:
    """The absolute expiry of a message from its AMQP ``expiration`` property (ms)."""
    expiration = (message.get("properties") or {}).get("expiration")
    if expiration in (None, ""):
        return None
    try:
        return utcnow() + timedelta(milliseconds=float(expiration))
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------- store operations

def bindings(store: Store, exchange: str) -> list[tuple[str, str]]:
    """``(queue, routing_key)`` of the live bindings of ``exchange``."""
    return store.bindings.of_exchange(exchange, now=utcnow())


def bound_queues(store: Store, exchange: str) -> list[str]:
    return sorted({queue for queue, _ in bindings(store, exchange)})


def touch_queues(store: Store, queues: list[str], expires: float) -> set[str]:
    """Push the expiry of ``queues``' bindings forward; returns the queues that had one."""
    return store.bindings.touch(queues=queues, expires_at=utcnow() + timedelta(seconds=expires))


def unbind_queue(store: Store, queue: str) -> None:
    store.bindings.unbind_queue(queue)


@dataclass
class MaintenanceReport:
    expired_queues: list[str] = field(default_factory=list)
    dropped_messages: int = 0

    def __bool__(self) -> bool:
        return bool(self.expired_queues or self.dropped_messages)


def maintain(store: Store, *, max_age: float = TRANSIENT_MAX_AGE, max_backlog: int = TRANSIENT_MAX_BACKLOG,
             on_progress: Callable[[int], None] | None = None) -> MaintenanceReport:
    """Remove expired bindings and their queues, and bound the backlog of transient queues.

    Every step is a short transaction of at most ``clear_batch_size`` rows.
    """
    report = MaintenanceReport()
    batch = store.options.clear_batch_size
    now = utcnow()
    report.expired_queues = store.bindings.expire(now=now)
    for queue in report.expired_queues:
        while True:
            n = store.queues.drop_waiting(queues=[queue], before=None, now=now, limit=batch)
            report.dropped_messages += n
            if on_progress and n:
                on_progress(n)
            if n < batch:
                break
    transient = store.bindings.transient_queues()
    if transient:
        old = now - timedelta(seconds=max_age)
        while True:
            n = store.queues.drop_waiting(queues=transient, before=old, now=now, limit=batch)
            report.dropped_messages += n
            if on_progress and n:
                on_progress(n)
            if n < batch:
                break
        for queue in transient:
            while True:
                n = store.queues.trim_backlog(queue=queue, keep=max_backlog, limit=batch)
                report.dropped_messages += n
                if n < batch:
                    break
    if report:
        log.info("fanout maintenance: removed %d expired queue(s) %s, dropped %d stale message(s)",
                    len(report.expired_queues), report.expired_queues, report.dropped_messages)
    return report
