"""Jobs claimed but not yet handed to kombu: the claim thread's batches waiting for the hub, and the
rest of a batch the blocking loop delivers one message per ``drain_events`` call.

Why one place: both hold claims that kombu's prefetch count cannot see, and
both must give them back, in place, when they cannot be delivered any more:
their channel closed, or the worker is shutting down (it takes no more jobs;
a broadcast, remote control among them, holds no claim and is still
delivered).  Thread-safe: the claim thread adds while the hub takes.
"""
from __future__ import annotations

import collections
import threading
from typing import Any

from .claim_round import Messages

#: (channel, message payload, queue name)
Entry = tuple[Any, dict, str]


class Undelivered:
    """Claimed messages in claim order, each with the channel it was claimed for."""

    def __init__(self) -> None:
        self._entries: collections.deque[Entry] = collections.deque()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def keep(self, channel: Any, messages: Messages) -> None:
        with self._lock:
            self._entries.extend((channel, payload, queue) for payload, queue in messages)

    def count(self, channel: Any) -> int:
        """How many wait for ``channel`` (counted against its prefetch: ``Channel._claim_limit``)."""
        with self._lock:
            return sum(1 for entry in self._entries if entry[0] is channel)

    def next(self) -> Entry | None:
        """The oldest message that may still be delivered; those that may not go back to ready on the way."""
        while True:
            with self._lock:
                if not self._entries:
                    return None
                entry = self._entries.popleft()
            channel, payload, queue = entry
            if _deliverable(channel, queue):
                return entry
            channel._release(payload["properties"]["delivery_tag"])

    def release(self, channel: Any = None) -> None:
        """Give back what waits for ``channel`` (default: for every channel)."""
        with self._lock:
            gone = [entry for entry in self._entries if channel is None or entry[0] is channel]
            self._entries = collections.deque(entry for entry in self._entries
                                              if channel is not None and entry[0] is not channel)
        for ch, payload, _ in gone:
            ch._release(payload["properties"]["delivery_tag"])


def _deliverable(channel: Any, queue: str) -> bool:
    if channel.closed:
        return False
    worker = channel.worker
    return worker is None or queue in channel._no_ack_queues or not worker.stopping()
