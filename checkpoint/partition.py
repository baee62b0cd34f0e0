"""Parallel iteration: one job's enumeration split into N partitions, run as N jobs.

Why: a backfill over 50 million rows takes one worker days; split by key
range or by hash, N workers take a day each, and every partition keeps its
own cursor, interruptions and durable checkpoint (each is an ordinary
iterative job with a task id of its own).  The partitions complete as one
through a Celery chord (a result backend is required)::

    from checkpoint.partition import in_partitions

    result = in_partitions(backfill.s(account_id), 8, then=report_done.s())

Each run sees its :class:`Partition` as ``self.partition`` (``Partition(0, 1)``,
the whole job, when it was not split) and builds its share of the enumeration::

    def build_enumerator(self, account_id, *, cursor=None):
        lo, hi = self.partition.range(0, 50_000_000)
        return self.enumerate.integers(lo, hi, cursor=cursor)

or, when the keys are not a dense range, keeps the items it ``owns``.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["Partition", "in_partitions", "PARTITION_KWARG"]

#: The keyword argument a partition's message carries ``[index, count]`` in (removed before the task sees it).
PARTITION_KWARG = "checkpoint_partition"


@dataclass(frozen=True)
class Partition:
    """Partition ``index`` of ``count`` (0-based)."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.count, int) and self.count >= 1 and isinstance(self.index, int)
                and 0 <= self.index < self.count):
            raise ValueError(f"a partition is [index, count] with 0 <= index < count, got [{self.index!r}, "
                             f"{self.count!r}]")

    @classmethod
    def from_message(cls, value: Any) -> Optional["Partition"]:
        if value is None:
            return None
        try:
            index, count = value
        except (TypeError, ValueError):
            raise ValueError(f"{PARTITION_KWARG} must be [index, count], got {value!r}") from None
        return cls(index, count)

    def to_message(self) -> list[int]:
        return [self.index, self.count]

    def range(self, start: int, stop: int) -> tuple[int, int]:
        """This partition's contiguous share ``[lo, hi)`` of ``range(start, stop)``; shares differ by at most 1."""
        size, extra = divmod(max(0, stop - start), self.count)
        lo = start + self.index * size + min(self.index, extra)
        return lo, lo + size + (1 if self.index < extra else 0)

    def owns(self, key: Any) -> bool:
        """Whether ``key`` belongs here: integers by modulo, anything else by CRC-32 of ``str(key)``.

        Stable across processes and Python runs (unlike ``hash()``), so a
        resumed partition keeps exactly the keys it had.
        """
        if self.count == 1:
            return True
        number = key if isinstance(key, int) else zlib.crc32(str(key).encode("utf-8"))
        return number % self.count == self.index


WHOLE = Partition()


def in_partitions(signature: Any, partitions: int, *, then: Any = None) -> Any:
    """Send ``signature`` as ``partitions`` jobs, one per partition; they complete as one.

    With ``then`` (a signature), a chord: ``then`` receives the list of the
    partitions' results when the last one completes; returns its AsyncResult.
    Without, a group; returns the GroupResult (``.get()`` waits for all).
    Interrupted, retried and redelivered partitions keep their place in the
    group (a re-enqueue keeps the task id and the chord/group membership).
    """
    from celery import chord, group
    if not isinstance(partitions, int) or partitions < 1:
        raise ValueError(f"partitions must be a positive integer, got {partitions!r}")
    if PARTITION_KWARG in (signature.kwargs or {}):
        raise ValueError(f"{signature.task} is already partitioned ({PARTITION_KWARG} is set)")
    header = group(signature.clone(kwargs={PARTITION_KWARG: Partition(i, partitions).to_message()})
                   for i in range(partitions))
    if then is None:
        return header.apply_async()
    return chord(header)(then)
