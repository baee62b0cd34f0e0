"""Delivery through Celery's event loop (asynloop and AsynPool), on PostgreSQL.

Why: Celery runs a transport that has no event loop in its blocking loop,
where under prefork the main thread waits inside billiard for a free pool
process, and the pool idles while that thread waits on a claim.  A transport
that registers with the event loop gets Celery's asynchronous loop instead,
as Redis does: the hub hands jobs to pool processes over pipes and never
blocks.  Here a claim thread does the database work and passes each batch to
the hub through a pipe; the hub delivers it, since kombu and Celery expect
deliveries (and get acks) on the hub's thread.

On SQLite a claim is CPU in this process, and a second thread competing with
the hub for the GIL is slower than the blocking loop, so SQLite keeps that
(``Dialect.event_loop``; the ``event_loop`` option turns it off anywhere).

Prefetch: the claim thread counts a batch that is claimed but not yet
delivered against the prefetch (``Channel._claim_limit(undelivered)``), so
the worker never holds more than kombu's prefetch count.  A batch the hub
will not deliver (the channel or connection closed first) is released.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading

from . import fanout
from .notify import waiter_for
from .store import store_for

log = logging.getLogger("celery_sqlbackend.eventloop")

#: The claim thread claims once 1/CLAIM_SHARE of the prefetch is free (a
#: quarter: measured 6% faster than half on PostgreSQL; see ``bench/README.md``).
CLAIM_SHARE = 4


class ClaimFeed:
    """A claim thread that fills, and a pipe the hub reads to deliver, one connection's batches."""

    def __init__(self, transport, loop):
        self.transport = transport
        self.loop = loop
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        self._pending: collections.deque = collections.deque()   # (channel, payload, queue)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        loop.add_reader(self._r, self.on_readable)
        self._thread = threading.Thread(target=self._run, name="sqlq-claim", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ hub side

    def on_readable(self, *_):
        """Deliver what the claim thread claimed (on the hub's thread)."""
        with contextlib.suppress(BlockingIOError):
            os.read(self._r, 4096)
        if self._error is not None:
            error, self._error = self._error, None
            raise error          # a connection error: Celery reconnects, as with any broker
        while True:
            with self._lock:
                if not self._pending:
                    return
                channel, payload, queue = self._pending.popleft()
            if channel.closed:
                channel._release(payload["properties"]["delivery_tag"])
            else:
                channel.connection._deliver(payload, queue)

    def stop(self) -> None:
        """Stop claiming, wait for a claim in flight, give back what was not delivered."""
        self._stop.set()
        self.transport._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(30)
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self._r)
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.release_pending()

    def release_pending(self, channel=None) -> None:
        """Give back the undelivered batch of ``channel`` (default: of every channel)."""
        with self._lock:
            keep = collections.deque(p for p in self._pending if channel is not None and p[0] is not channel)
            gone = [p for p in self._pending if channel is None or p[0] is channel]
            self._pending = keep
        for ch, payload, _ in gone:
            ch._release(payload["properties"]["delivery_tag"])

    def undelivered(self, channel) -> int:
        with self._lock:
            return sum(1 for p in self._pending if p[0] is channel)

    # ------------------------------------------------------------------ claim thread

    def _run(self) -> None:
        transport = self.transport
        interval = transport.options.polling_interval
        waiter = None
        try:
            while not self._stop.is_set():
                transport._wake.clear()
                channels = [ch for ch in list(transport.channels) if ch._consumers and not ch.closed]
                if channels:   # (every channel of a connection shares one process)
                    channels[0].finish_completed()
                claimed, slots_free = self._claim_round(channels)
                if claimed or self._stop.is_set():
                    continue
                if waiter is None and channels:
                    waiter = waiter_for(channels[0].store)
                transport._wait_for_work(waiter, slots_free, channels[0].process if channels else None, interval)
        except BaseException as exc:   # a database that went away: the hub raises it
            log.warning("claiming stopped (%s: %s); the worker reconnects", exc.__class__.__name__, exc)
            self._error = exc
            with contextlib.suppress(OSError):
                os.write(self._w, b"!")
        finally:
            store_for(transport.client.hostname, transport.options).close_own_connection()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def _claim_round(self, channels) -> tuple[bool, bool]:
        """One claim per channel that has room; returns (anything claimed, any slot free)."""
        from . import transport as transport_module
        claimed = slots_free = False
        stopping = transport_module.worker_stopping
        if stopping is not None and stopping():
            return False, False     # a worker shutting down takes no new jobs
        for channel in channels:
            queues = list(channel._active_queues)
            if not queues:
                continue
            if channel._broadcast_only(queues):
                if not channel._broadcast_poll_due():
                    continue
                limit = channel._claim_limit()
            else:
                limit = channel._claim_limit(self.undelivered(channel), share=CLAIM_SHARE)
                slots_free = slots_free or limit > 0
            if limit <= 0:
                continue
            fanout.touch(channel, queues)
            messages = channel._claim(queues, limit)
            if messages:
                with self._lock:
                    self._pending.extend((channel, payload, queue) for payload, queue in messages)
                os.write(self._w, b".")
                claimed = True
        return claimed, slots_free
