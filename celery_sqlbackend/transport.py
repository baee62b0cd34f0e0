"""kombu transport that keeps messages in an SQL database.

Features
========
* Type: Virtual
* Supports Direct: Yes
* Supports Topic: Yes
* Supports Fanout: Yes (bindings are stored in the database, so broadcasts
  reach workers on every machine: ``celery inspect`` / ``control`` work)
* Supports Priority: Yes, 0-9, higher first (AMQP semantics, as kombu documents)
* Supports TTL: ETA/countdown are stored as scheduled executions; ``expires``
  is stored and honoured by the worker

Connection string
=================
``sqlq+<SQLAlchemy URL>``, after ``import celery_sqlbackend``::

    sqlq+sqlite:///jobs.sqlite3
    sqlq+postgresql+psycopg://user:password@db.example.com/app
    sqlq+mysql+pymysql://user:password@db.example.com/app

Transport options
=================
See :mod:`celery_sqlbackend.options` (one table, every default).

Loops
=====
The transport registers with Celery's event loop
(:mod:`celery_sqlbackend.eventloop`): on PostgreSQL a claim thread claims, on
SQLite and MySQL/MariaDB the hub's own thread does.  With ``event_loop=False``
Celery runs its blocking loop, which calls :meth:`Transport.drain_events`, as
does any plain kombu consumer (``celery inspect``'s reply reader among them):
each call delivers one message, the rest of a claimed batch waiting in the
transport for the next calls and going back to ready if its channel closes.
Every loop runs the same claim round (:mod:`celery_sqlbackend.claim_round`),
which claims through :meth:`Channel._claim`.

Delivery semantics
==================
A claimed job stays claimed by this process (``claimed_executions``) until it
has *finished running*, whatever ``acks_late`` says: an early ack only marks
the claim as started, and the claim is removed in the same transaction that
marks the job finished.  ``reject(requeue=True)`` and a closing channel put
unacked jobs back to ready in place.  A process that dies is pruned by the
others (see :mod:`celery_sqlbackend.pruner`).
"""
from __future__ import annotations

import threading
from time import monotonic

from kombu.transport import virtual
from sqlalchemy import exc as sa_exc

from .channel import Channel, QoS, log  # noqa: F401  (kombu resolves celery_sqlbackend.transport:Transport)
from .claim_round import Messages, Outage, claim_round, wait_for_work
from .eventloop import ClaimFeed
from .notify import waiter_for
from .options import Options, for_connection
from .store import store_for
from .undelivered import Undelivered
from .urls import SCHEME, mask as mask_url


class Transport(virtual.Transport):
    Channel = Channel

    polling_interval = None  # from Options, see drain_events
    can_parse_url = True
    # Not "sql": Celery disables task events for driver_type "sql" (kombu's sqla+,
    # which has no fanout).  Anything but amqp/redis keeps mingle and gossip off.
    driver_type = "sqlq"
    driver_name = "sqlalchemy"
    default_port = 0

    implements = virtual.Transport.implements.extend(
        asynchronous=False,   # per connection: see __init__ and eventloop
        exchange_type=frozenset(["direct", "topic", "fanout"]),
        heartbeats=False,
    )

    connection_errors = virtual.Transport.connection_errors + (
        sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError,
    )
    channel_errors = virtual.Transport.channel_errors + (sa_exc.ProgrammingError,)

    def __init__(self, client, **kwargs):
        super().__init__(client, **kwargs)
        self.options = Options.from_mapping(for_connection(client))
        self._wake = threading.Event()
        self._feed: ClaimFeed | None = None
        #: What the blocking loop claimed and has not delivered yet: see drain_events.
        self._held = Undelivered()
        self._outage = Outage("worker loop")
        event_loop = self.options.event_loop
        if event_loop is None:
            event_loop = store_for(client.hostname, self.options).dialect.event_loop
        # Celery picks its event loop (and AsynPool) from this, per connection.
        self.implements = self.implements.extend(asynchronous=event_loop)

    def as_uri(self, uri: str, include_password: bool = False, mask: str = "**") -> str:
        """The broker URL as Celery shows it (banner, "Connected to", retry lines): password masked by
        ``urls.mask``, which also copes with passwords kombu's parser gets wrong (``/``, ``@``, ``#``)."""
        full = f"{SCHEME}+{uri}"
        return full if include_password else mask_url(full)

    def driver_version(self):
        import sqlalchemy
        return sqlalchemy.__version__

    def create_channel(self, connection):
        channel = super().create_channel(connection)
        channel._transport_ref = self
        return channel

    def establish_connection(self):
        # Fail here (where Celery retries with backoff) rather than mid-claim.
        store = store_for(self.client.hostname, self.options)
        store.ping()
        store.ensure_schema()
        return super().establish_connection()

    def register_with_event_loop(self, connection, loop):
        """Celery's event loop starts (asynloop): claims go to a thread or the hub, deliveries come from the hub."""
        if not self.implements.asynchronous:
            return
        if self._feed is not None and not (self._feed.alive and self._feed.loop is loop):
            self._feed.stop()
            self._feed = None
        if self._feed is None:
            dialect = store_for(self.client.hostname, self.options).dialect
            self._feed = ClaimFeed(self, loop, on_hub=not dialect.claim_thread)

    def close_connection(self, connection):
        feed, self._feed = self._feed, None
        if feed is not None:
            feed.stop()
        super().close_connection(connection)

    def drain_events(self, connection, timeout=None):
        """Celery's blocking loop: deliver one message; claim rounds until one has a message to deliver;
        between empty rounds, wait for whichever can change that (an ack, or NOTIFY or the poll:
        ``claim_round.wait_for_work``).

        One message per call, the rest of a claimed batch kept for the next calls (``_held``), as
        kombu's virtual transports deliver: kombu's remote-control client stops after as many calls as
        it names workers (``Mailbox._collect``), and one call that delivered two replies left the
        next waiting out the whole timeout for a third.
        """
        if self._deliver_held():
            return
        start = monotonic()
        interval = self.options.polling_interval
        waiter = None
        while True:
            self._wake.clear()
            round_ = claim_round(self, "loop", self._hold_batch)
            if self._deliver_held() or round_.claimed:
                return
            remaining = None if timeout is None else timeout - (monotonic() - start)
            if remaining is not None and remaining <= 0:
                raise TimeoutError("timed out")  # socket.timeout is TimeoutError
            wait = interval if remaining is None else min(interval, remaining)
            if round_.stopping:
                # Back to Celery's loop after one poll interval (not at once: no spinning if its
                # loop goes on a while), where it ends: waiting out the rest of its 2 s timeout
                # here held every warm shutdown up by 1-2 s.
                self._wake.wait(wait)
                raise TimeoutError("the worker is shutting down")
            if self._outage.waited_out(round_, self._wake, interval, remaining):   # see claim_round
                continue
            if waiter is None and self.channels:
                waiter = waiter_for(self.channels[0].store)
            acks = round_.channels[0].process.acks if round_.channels else None
            wait_for_work(self._wake, waiter, round_.slots_free, acks, wait)

    def _hold_batch(self, channel: Channel, messages: Messages) -> None:
        log.debug("claimed %d message(s) from %s", len(messages), sorted(set(q for _, q in messages)))
        self._held.keep(channel, messages)

    def _deliver_held(self) -> bool:
        """Deliver the oldest message claimed and not yet delivered, if any (see ``undelivered``)."""
        entry = self._held.next()
        if entry is None:
            return False
        channel, payload, queue = entry
        with channel.process.acks.loop_away():   # (a delivery may block in billiard: acks go meanwhile)
            self._deliver(payload, queue)
        return True

    def release_held(self, channel: Channel) -> None:
        """Give back what was claimed for ``channel`` and not delivered (it is closing)."""
        self._held.release(channel)
