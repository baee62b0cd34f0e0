"""Delivery through Celery's event loop (asynloop and AsynPool), on every engine.

Why: Celery runs a transport that has no event loop in its blocking loop,
where under prefork the main thread waits inside billiard for a free pool
process, billiard's own threads pass every job and result on, and the pool
idles while the main thread waits on a claim.  A transport that registers
with the event loop gets Celery's asynchronous loop instead, as Redis does:
the hub hands jobs to pool processes over pipes and never blocks on them.

Who claims (``Dialect.claim_thread``):

* PostgreSQL: a claim thread.  A claim is mostly a wait on the server (a
  round trip, a durable commit), which the thread spends beside the hub.  It
  passes each batch to the hub through a pipe; the hub delivers it, since
  kombu and Celery expect deliveries (and send acks) on the hub's thread.
* SQLite: the hub's thread itself.  A claim there is CPU in this process; a
  thread would only compete with the hub for the GIL.  The hub claims when
  kicked: by an ack that frees a prefetch slot, by a commit that made a job
  ready (the wake socket beside the file, ``sqlite_wake``), or by the polling interval.
* MariaDB: the hub's thread too, a whole prefetch at a time.  A claim is one
  round trip there (``store.claim_packet``); fewer, larger claims on the hub
  drained faster than a claim thread's, or as fast for more of the server's
  CPU per job (``bench/README.md``).

Each turn claims with the claim round every loop shares
(:mod:`.claim_round`, which also says how much to claim at once).

Prefetch: the claim thread counts a batch that is claimed but not yet
delivered against the prefetch (``Channel._claim_limit(undelivered)``), so
the worker never holds more than kombu's prefetch count.  What the hub
will not deliver (the channel or connection closed first, or the worker is
shutting down) is released (:mod:`.undelivered`, shared with the blocking loop).
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref

from sqlalchemy.exc import SQLAlchemyError

from .ack_buffer import WRITE_DELAY, AckBuffer
from .claim_round import Messages, Outage, RoundResult, claim_round, wait_for_work
from .notify import waiter_for
from .undelivered import Undelivered
from .store import store_for

log = logging.getLogger("celery_sqlbackend.eventloop")


#: The feeds of this process, for ``wake_hubs``.
_feeds: "weakref.WeakSet[ClaimFeed]" = weakref.WeakSet()


def wake_hubs() -> None:
    """Wake every event loop of this process now: the worker is stopping.

    Why: Celery looks at its stop flag only between two waits of the hub, and
    an idle hub whose claims come from a thread (PostgreSQL) has no timer of
    ours to end its wait: it slept on until Celery's next timer, seconds after
    the SIGTERM.  Called from the signal handler (``worker_shutting_down``);
    a write to a pipe is safe there.
    """
    for feed in list(_feeds):
        feed.wake()


class ClaimFeed:
    """One connection's claims in the event loop: a claim thread (or the hub) fills, the hub delivers."""

    def __init__(self, transport, loop, on_hub: bool = False):
        self.transport = transport
        self.loop = loop
        self.on_hub = on_hub
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        self._pending = Undelivered()   # claimed, waiting for the hub to deliver
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._kicked = False
        self._outage = Outage("claim thread" if not on_hub else "event loop")
        loop.add_reader(self._r, self.on_readable)
        _feeds.add(self)
        if on_hub:
            self._thread = None
            self._hub_thread: int | None = None
            self._flush_due = None
            #: How long acks wait for a claim to carry them before the hub writes them alone.
            self.write_delay = WRITE_DELAY
            loop.on_tick.add(self._on_tick)
            self._poll = loop.call_repeatedly(transport.options.polling_interval, self.kick)
            # Wake-ups at commit (a SQLite file's wake socket, ``sqlite_wake``): a thread waits on them and
            # kicks the hub through the pipe above, as a thread pool's acks do, so the hub's readers stay
            # the pool's and ours.
            self._waker = waiter_for(store_for(transport.client.hostname, transport.options))
            if self._waker is not None:
                threading.Thread(target=self._wait_for_wakes, name="sqlq-wake", daemon=True).start()
        else:
            self._thread = threading.Thread(target=self._run, name="sqlq-claim", daemon=True)
            self._thread.start()

    def kick(self) -> None:
        """Claim on the hub at its next turn (``on_hub``): a slot came free, or the poll interval passed.

        The hub runs ``_on_tick`` once per turn of its loop, before it waits for
        events, so any number of kicks make one claim round, and a kick from
        the hub's own thread (acks, the poll timer) costs no system call.  A
        kick from another thread (a thread pool's ack) wakes the hub through the pipe.
        """
        if not self.on_hub or self._kicked or self._stop.is_set():
            return
        self._kicked = True
        if threading.get_ident() != self._hub_thread:
            with contextlib.suppress(OSError):
                os.write(self._w, b"k")

    def wake(self) -> None:
        """End the hub's current wait (``wake_hubs``).  Not once stopping: the pipe may be closed."""
        if not self._stop.is_set():
            with contextlib.suppress(OSError):
                os.write(self._w, b"w")

    def _wait_for_wakes(self) -> None:
        while not self._stop.is_set():
            if self._waker.wait(1.0) and not self._stop.is_set():
                self.kick()

    def _on_tick(self) -> None:
        self._hub_thread = threading.get_ident()
        if self._kicked and not self._stop.is_set():
            self._kicked = False
            self._claim_on_hub()
            if self._pending:
                self._deliver_pending()
                # AsynPool hands jobs to its processes from a tick callback of its
                # own, which may have run already this turn: wake the hub, so that
                # its wait for events does not hold the batch for a poll interval.
                with contextlib.suppress(OSError):
                    os.write(self._w, b"d")

    # ------------------------------------------------------------------ hub side

    def on_readable(self, *_):
        """The claim thread wrote: deliver its batch, or raise its error (on the hub's thread)."""
        with contextlib.suppress(BlockingIOError):
            os.read(self._r, 4096)
        if self._error is not None:
            error, self._error = self._error, None
            raise error          # a connection error: Celery reconnects, as with any broker
        self._deliver_pending()

    def _deliver_pending(self) -> None:
        while (entry := self._pending.next()) is not None:
            channel, payload, queue = entry
            channel.connection._deliver(payload, queue)

    def _claim_on_hub(self) -> None:
        """One claim round on the hub's thread (``on_hub``); after a claim, another round next turn
        (which claims only if the prefetch is free again)."""
        round_ = self._claim_round()
        if round_.database_away is not None:
            self._outage.failed(round_.database_away, 0)   # the poll timer kicks the next round
            return
        self._outage.ok()
        if round_.claimed:
            self.kick()
        elif self._flush_due is None and round_.channels and round_.channels[0].process.acks.has_pending_writes:
            # Acks that no claim carries: written by the hub a moment later, still in a batch.
            self._flush_due = self.loop.call_later(self.write_delay, self._flush_on_hub,
                                                   round_.channels[0].process.acks)

    def _flush_on_hub(self, acks: AckBuffer) -> None:
        """Write the acks no claim has carried once the oldest has waited ``write_delay``; a claim
        since the timer was set took those it was set for, so wait out the age of the ones left."""
        self._flush_due = None
        if not acks.has_pending_writes or self._stop.is_set():
            return
        left = acks.write_due_in(self.write_delay)
        if left > 0:
            self._flush_due = self.loop.call_later(left, self._flush_on_hub, acks)
            return
        with contextlib.suppress(SQLAlchemyError):   # logged and deferred by flush
            acks.flush()

    def stop(self) -> None:
        """Stop claiming, wait for a claim in flight, give back what was not delivered."""
        self._stop.set()
        _feeds.discard(self)
        self.transport._wake.set()
        if self.on_hub:
            self.loop.on_tick.discard(self._on_tick)
            for timer in (self._poll, self._flush_due):
                if timer is not None:
                    with contextlib.suppress(Exception):
                        timer.cancel()
        elif self._thread is not threading.current_thread():
            self._thread.join(30)
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self._r)
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.release_pending()

    def release_pending(self, channel=None) -> None:
        """Give back the undelivered batch of ``channel`` (default: of every channel)."""
        self._pending.release(channel)

    # ------------------------------------------------------------------ claim thread

    def _run(self) -> None:
        transport = self.transport
        interval = transport.options.polling_interval
        waiter = None
        try:
            while not self._stop.is_set():
                transport._wake.clear()
                round_ = self._claim_round()
                if round_.database_away is not None:
                    self._stop.wait(self._outage.failed(round_.database_away, interval))
                    continue
                self._outage.ok()
                if round_.claimed or self._stop.is_set():
                    continue
                channels = round_.channels
                if waiter is None and channels:
                    waiter = waiter_for(channels[0].store)
                wait_for_work(transport._wake, waiter, round_.slots_free,
                              channels[0].process.acks if channels else None, interval)
        except BaseException as exc:   # a database that went away: the hub raises it
            log.warning("claiming stopped (%s: %s); the worker reconnects", exc.__class__.__name__, exc)
            self._error = exc
            with contextlib.suppress(OSError):
                os.write(self._w, b"!")
        finally:
            store_for(transport.client.hostname, transport.options).close_own_connection()

    @property
    def alive(self) -> bool:
        return (self.on_hub or self._thread.is_alive()) and not self._stop.is_set()

    def _claim_round(self) -> RoundResult:
        """One claim round (``claim_round``), its batches kept for the hub to deliver."""
        return claim_round(self.transport, "hub" if self.on_hub else "thread", self._keep, self._pending.count)

    def _keep(self, channel, messages: Messages) -> None:
        self._pending.keep(channel, messages)
        if not self.on_hub:
            os.write(self._w, b".")
