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
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal

from . import fanout

if TYPE_CHECKING:   # (type names only: never imported at run time)
    from .ack_buffer import AckBuffer

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
    count cannot know about.
    """
    channels = consuming_channels(transport)
    claimed = slots_free = False
    if not channels:
        return RoundResult(channels, claimed, slots_free)
    first = channels[0]           # (every channel of a connection shares one process)
    first.finish_completed()
    if first.worker is not None and first.worker.stopping():
        return RoundResult(channels, claimed, slots_free)   # a worker shutting down takes no new jobs
    tasks: list[tuple[Any, Messages]] = []
    broadcast: list[tuple[Any, list[str]]] = []
    for channel in channels:
        queues = list(channel._active_queues)
        if not queues:
            continue
        fanout.touch(channel, queues)
        if channel._broadcast_only(queues):
            broadcast.append((channel, queues))
            continue
        waiting = undelivered(channel) if undelivered is not None else 0
        limit = channel._claim_limit(waiting, share=share_of(claimer, channel))
        slots_free = slots_free or limit > 0
        if limit > 0:
            messages = channel._claim(queues, limit)
            if messages:
                tasks.append((channel, messages))
    # Remote control (pidbox) and other broadcast queues never hold a slot.  They are
    # polled once per polling interval, and always right *after* a claim that took
    # jobs: whatever was published before those jobs (a revoke sent before its task)
    # had committed by then, so it is found now and delivered first.
    for channel, queues in broadcast:
        if not (tasks or channel._broadcast_poll_due()):
            continue
        limit = channel._claim_limit()
        messages = channel._claim(queues, limit) if limit > 0 else []
        if messages:
            deliver(channel, messages)
            claimed = True
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
