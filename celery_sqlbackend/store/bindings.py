"""Fanout bindings: which queues an exchange delivers to, some of them expiring.

Remote control and event queues are bound with an expiry that their
consumers push forward (``touch``); an expired binding is deleted, and a
queue left with no binding is dropped by ``fanout``'s maintenance.
"""
from __future__ import annotations

from datetime import datetime
from typing import Sequence

from sqlalchemy import Connection, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from .gateway import Gateway
from .schema import Tables


def bind(conn: Connection, t: Tables, *, exchange: str, queue: str, routing_key: str,
         expires_at: datetime | None) -> None:
    """Insert the binding, or push its expiry forward if it exists."""
    b = t.bindings
    where = (b.c.exchange == exchange, b.c.queue_name == queue, b.c.routing_key == routing_key)
    if conn.execute(update(b).where(*where).values(expires_at=expires_at)).rowcount == 0:
        # Two workers declaring the same queue at once: the loser's insert hits the
        # unique constraint inside a savepoint, and the binding exists either way.
        try:
            with conn.begin_nested():
                conn.execute(insert(b).values(exchange=exchange, queue_name=queue, routing_key=routing_key,
                                              expires_at=expires_at))
        except IntegrityError:
            conn.execute(update(b).where(*where).values(expires_at=expires_at))


def of_exchange(conn: Connection, t: Tables, *, exchange: str, now: datetime) -> list[tuple[str, str]]:
    """``(queue, routing_key)`` of the bindings of ``exchange`` that have not expired."""
    b = t.bindings
    rows = conn.execute(select(b.c.queue_name, b.c.routing_key).where(
        b.c.exchange == exchange, (b.c.expires_at.is_(None)) | (b.c.expires_at >= now))).all()
    return [(row.queue_name, row.routing_key) for row in rows]


def touch(conn: Connection, t: Tables, *, queues: Sequence[str], expires_at: datetime) -> set[str]:
    """Push the expiry of the (expiring) bindings of ``queues`` forward; the queues that had one."""
    b = t.bindings
    found = set(conn.execute(select(b.c.queue_name).where(
        b.c.queue_name.in_(list(queues)), b.c.expires_at.is_not(None)).distinct()).scalars())
    if found:
        conn.execute(update(b).where(b.c.queue_name.in_(found), b.c.expires_at.is_not(None))
                     .values(expires_at=expires_at))
    return found


def unbind_queue(conn: Connection, t: Tables, *, queue: str) -> None:
    conn.execute(delete(t.bindings).where(t.bindings.c.queue_name == queue))


def expire(conn: Connection, t: Tables, *, now: datetime) -> list[str]:
    """Delete expired bindings; returns the queues left with no binding at all."""
    b = t.bindings
    queues = list(conn.execute(select(b.c.queue_name).where(b.c.expires_at < now).distinct()).scalars())
    if not queues:
        return []
    conn.execute(delete(b).where(b.c.expires_at < now))
    still = set(conn.execute(select(b.c.queue_name).where(b.c.queue_name.in_(queues)).distinct()).scalars())
    return sorted(q for q in queues if q not in still)


def transient_queues(conn: Connection, t: Tables) -> list[str]:
    """Queues with an expiring binding (reply and event queues)."""
    b = t.bindings
    return sorted(conn.execute(select(b.c.queue_name).where(b.c.expires_at.is_not(None)).distinct()).scalars())


class Bindings(Gateway):
    """``store.bindings``: fanout bindings."""

    __slots__ = ()

    def bind(self, *, exchange: str, queue: str, routing_key: str, expires_at: datetime | None) -> None:
        self.store.run(bind, self.t, exchange=exchange, queue=queue, routing_key=routing_key, expires_at=expires_at)

    def of_exchange(self, exchange: str, *, now: datetime) -> list[tuple[str, str]]:
        return self.store.read(of_exchange, self.t, exchange=exchange, now=now)

    def touch(self, *, queues: Sequence[str], expires_at: datetime) -> set[str]:
        return self.store.run(touch, self.t, queues=queues, expires_at=expires_at)

    def unbind_queue(self, queue: str) -> None:
        self.store.run(unbind_queue, self.t, queue=queue)

    def expire(self, *, now: datetime) -> list[str]:
        return self.store.run(expire, self.t, now=now)

    def transient_queues(self) -> list[str]:
        return self.store.read(transient_queues, self.t)
