"""One claim round, the same for every loop that claims.

Three loops claim: Celery's blocking loop (``Transport.drain_events``), the
claim thread of the event loop on PostgreSQL, and the hub itself on SQLite
(both in :mod:`.eventloop`).  Each turn of any of them is one
``claim_round``: record the jobs that finished, then claim once per consuming
channel that has room, and hand what was claimed to ``deliver``.  They
differ only in *how much room* makes a claim worth it (``SHARE``) and in
what they do with a batch: the blocking loop delivers it at once, the
claim thread passes it to the hub.

How much room: a claim costs about the same for one job as for eight, so a
claim waits until 1/share of the prefetch is free (see
``Channel._claim_limit``).  The blocking loop waits for half: there every
claim is pool idle time.  A claim thread waits for a quarter, so that the
pool stays fed while it waits on the server (measured 6% faster than half on
PostgreSQL).  The hub waits for all of it: there the claim is the CPU cost
per batch, so the batch is made as large as the prefetch allows (measured:
2,200-2,900 jobs/s on SQLite against 1,300-2,100 for half and a quarter; see
``bench/README.md``).  It can only do so in a Celery worker, which says which
unacked jobs are running (``WorkerHooks.running_tags``), so that a claim
waits for nothing but deliveries the pool has not started; a plain kombu
consumer holds its unacked messages itself, and there the hub claims as the
thread does.

The database going away is not a lost broker connection (``Outage``): a round
that cannot reach it claims nothing, and its loop waits and tries again.
Raising it to Celery instead would make the consumer "reconnect", and Celery
then drops the deliveries it had prefetched, even those already written to a
pool process, which still runs them but whose acks it then discards
(``AsynPool.flush``, counting on the broker to redeliver): jobs run and never
recorded, released later and run twice.  Claims live in the database, so there is nothing to
re-establish; the engine's pool reconnects by itself.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal

from . import fanout
from .store.claim_packet import Look
from .store.dialects import is_disconnect

if TYPE_CHECKING:   # (type names only: never imported at run time)
    from .ack_buffer import AckBuffer

log = logging.getLogger("celery_sqlbackend.transport")

Claimer = Literal["loop", "thread", "hub"]

#: A claim waits until 1/SHARE of the prefetch is free (see the module doc).
SHARE: dict[Claimer, int] = {"loop": 2, "thread": 4, "hub": 1}

#: What a round claimed from one channel: (message payload, queue name) pairs.
Messages = list[tuple[dict, str]]


@dataclass
class RoundResult:
    channels: list        # the consuming channels of the connection
    claimed: bool         # anything claimed
    slots_free: bool      # any prefetch slot free (so an empty round means empty queues)
    #: Why the round could not reach the database, if it could not (``Outage``).
    database_away: BaseException | None = None
    #: The worker is shutting down: the round claimed nothing and no later round will.
    stopping: bool = False


class Outage:
    """One loop's view of the database being away: logged once, waited out with backoff.

    The longest wait stays short (``MAX_WAIT``): a worker should claim again
    within seconds of the database coming back.
    """

    MAX_WAIT = 2.0

    def __init__(self, name: str):
        self.name = name
        self.since: float | None = None
        self._wait = 0.0

    def failed(self, exc: BaseException, first_wait: float) -> float:
        """The database is away: how long to wait before the next round."""
        if self.since is None:
            self.since = time.monotonic()
            self._wait = first_wait
            log.warning("the %s cannot reach the database (%s: %s); claiming again when it is back, "
                        "keeping every job delivered so far", self.name, exc.__class__.__name__,
                        str(exc).splitlines()[0] if str(exc) else "")
        else:
            self._wait = min(self.MAX_WAIT, max(first_wait, self._wait * 2))
        return self._wait

    def waited_out(self, round_: RoundResult, wake: threading.Event, first_wait: float,
                   remaining: float | None) -> bool:
        """After a round of the blocking loop: if it found the database away, wait (the backoff,
        at most ``remaining``, or until ``wake``) and say so; otherwise note that it is back."""
        if round_.database_away is None:
            self.ok()
            return False
        pause = self.failed(round_.database_away, first_wait)
        wake.wait(pause if remaining is None else min(pause, remaining))
        return True

    def ok(self) -> None:
        if self.since is not None:
            log.warning("the %s reaches the database again after %.1fs", self.name, time.monotonic() - self.since)
            self.since = None


def consuming_channels(transport: Any) -> list:
    return [ch for ch in list(transport.channels) if ch._consumers and not ch.closed]


def share_of(claimer: Claimer, channel: Any) -> int:
    if claimer == "hub" and channel.worker is None:
        return SHARE["thread"]      # a plain kombu consumer: see the module doc
    return SHARE[claimer]


def claim_round(transport: Any, claimer: Claimer, deliver: Callable[[Any, Messages], None],
                undelivered: Callable[[Any], int] | None = None) -> RoundResult:
    """Record finished jobs, then one claim per consuming channel that has room; ``deliver`` each batch.

    ``undelivered(channel)``: jobs claimed for it but not handed to kombu yet
    (the claim thread's batches waiting for the hub), which kombu's prefetch
    count cannot know about.  A round that cannot reach the database says so
    (``database_away``) instead of raising: see the module doc.
    """
    channels = consuming_channels(transport)
    try:
        return _claim_round(transport, channels, claimer, deliver, undelivered)
    except Exception as exc:
        if not is_disconnect(exc):
            raise
        log.debug("claim round failed: the database is away", exc_info=True)
        return RoundResult(channels, claimed=False, slots_free=False, database_away=exc)


def _claim_round(transport: Any, channels: list, claimer: Claimer, deliver: Callable[[Any, Messages], None],
                 undelivered: Callable[[Any], int] | None) -> RoundResult:
    claimed = slots_free = False
    if not channels:
        return RoundResult(channels, claimed, slots_free)
    first = channels[0]           # (every channel of a connection shares one process)
    first.finish_completed()
    if first.worker is not None and first.worker.stopping():
        return RoundResult(channels, claimed, slots_free, stopping=True)   # a worker shutting down takes no new jobs
    if not first.process.may_claim():
        return RoundResult(channels, claimed, slots_free)   # heartbeats failing: see LocalProcess.may_claim
    tasks: list[tuple[Any, Messages]] = []
    consuming = [(channel, queues) for channel in channels if (queues := list(channel._active_queues))]
    broadcast = [(channel, queues) for channel, queues in consuming if channel._broadcast_only(queues)]
    # (MariaDB: the claim's own packet looks at the broadcast queues: ``store.claim_packet.Look``)
    look = Look([queue for _, queues in broadcast for queue in queues]) if broadcast else None
    try:
        for channel, queues in consuming:
            fanout.touch(channel, queues)
            if (channel, queues) in broadcast:
                continue
            waiting = undelivered(channel) if undelivered is not None else 0
            limit = channel._claim_limit(waiting, share=share_of(claimer, channel))
            slots_free = slots_free or limit > 0
            if limit > 0:
                if look is not None:
                    look.found = None    # (answered by this claim, or by none)
                messages = channel._claim(queues, limit, look=look)
                if messages:
                    tasks.append((channel, messages))
        # Remote control (pidbox) and other broadcast queues never hold a slot.  They are
        # polled once per polling interval, and always right *after* a claim that took
        # jobs: whatever was published before those jobs (a revoke sent before its task)
        # had committed by then, so it is found now and delivered first.  A claim that
        # looked at them in its own transaction, after taking its jobs, and found
        # nothing, has done that look already.
        for channel, queues in broadcast:
            due = channel._broadcast_poll_due()
            if not (tasks or due) or (tasks and look is not None and look.found is False):
                continue
            limit = channel._claim_limit()
            messages = channel._claim(queues, limit) if limit > 0 else []
            if messages:
                deliver(channel, messages)
                claimed = True
    finally:
        # Jobs already claimed are delivered even when a later statement of the round fails
        # (the database went away between two claims): a claim the worker holds but never
        # delivers would stay stuck, neither run nor released, for as long as the worker lives.
        for channel, messages in tasks:
            deliver(channel, messages)
            claimed = True
    return RoundResult(channels, claimed, slots_free)


def wait_for_work(wake: threading.Event, waiter: Any, slots_free: bool, acks: "AckBuffer | None",
                  wait: float) -> None:
    """Between empty rounds (blocking loop and claim thread): with prefetch slots free, wait for
    NOTIFY (``waiter``) or the poll; with none, for an ack (``wake``).  Acks that no claim
    carries meanwhile are written by the ack writer thread (``loop_away``)."""
    with acks.loop_away() if acks is not None else contextlib.nullcontext():
        if waiter is not None and slots_free:
            waiter.wait(wait)
        else:
            wake.wait(wait)
