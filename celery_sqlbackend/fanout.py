"""Broadcast (fanout) exchanges, with bindings kept in the database.

kombu's in-memory exchange table only knows the queues declared by *this*
connection.  A broadcast (``celery inspect``, ``control shutdown``, events)
must reach the queues of every worker on every machine, so bindings of fanout
exchanges are rows, and publishing to one enqueues a copy per bound queue.
"""
from __future__ import annotations

from .store import Store


def bind(store: Store, exchange: str, queue: str, routing_key: str = "") -> None:
    store.q("bind", exchange=exchange, queue=queue, routing_key=routing_key or "")


def bound_queues(store: Store, exchange: str) -> list[str]:
    return store.read(_bound, store, exchange)


def _bound(conn, store, exchange):
    from .store import queries
    return queries.bound_queues(conn, store.t, exchange=exchange)


def unbind_queue(store: Store, queue: str) -> None:
    store.q("unbind_queue", queue=queue)
