"""checkpoint.partition: shares of a range and of keys, and a partition kept across a run's re-enqueues."""
from __future__ import annotations

import uuid

import pytest
from celery import Celery

from checkpoint import IterativeTask, MemoryStore
from checkpoint.partition import PARTITION_KWARG, Partition, in_partitions
from checkpoint.testing import run_to_completion


@pytest.mark.parametrize("n,count", [(10, 3), (7, 7), (3, 5), (0, 2), (1000, 8)])
def test_ranges_cover_every_index_once(n, count):
    covered = [i for k in range(count) for i in range(*Partition(k, count).range(0, n))]
    assert covered == list(range(n))
    sizes = [len(range(*Partition(k, count).range(0, n))) for k in range(count)]
    assert max(sizes) - min(sizes) <= 1


def test_every_key_has_exactly_one_owner_and_keeps_it():
    keys = list(range(50)) + [f"sku-{i}" for i in range(50)] + [uuid.UUID(int=i) for i in range(50)]
    owners = [[k for k in range(4) if Partition(k, 4).owns(key)] for key in keys]
    assert all(len(o) == 1 for o in owners)
    assert Partition(1, 4).owns("sku-7") == (zlib_crc("sku-7") % 4 == 1), "stable: CRC-32, not hash()"


def zlib_crc(text):
    import zlib
    return zlib.crc32(text.encode())


def test_bad_partitions_are_clear_errors():
    with pytest.raises(ValueError, match="0 <= index < count"):
        Partition(3, 3)
    with pytest.raises(ValueError, match=r"must be \[index, count\]"):
        Partition.from_message("1/3")


def test_a_partition_runs_its_share_and_keeps_it_across_interruptions():
    app = Celery(f"p{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    seen = []

    class Count(IterativeTask):
        name = f"count.{uuid.uuid4().hex[:6]}"
        cursor_store = MemoryStore()

        def build_enumerator(self, n, *, cursor=None):
            return self.enumerate.integers(*self.partition.range(0, n), cursor=cursor)

        def each_iteration(self, item, n):
            seen.append((item, self.partition.to_message()))

    task = app.register_task(Count())
    report = run_to_completion(task, 30, stop_every=3, **{PARTITION_KWARG: [1, 3]})
    assert seen == [(i, [1, 3]) for i in range(10, 20)] and report.times_interrupted == 3
    seen.clear()
    run_to_completion(task, 5)
    assert seen == [(i, [0, 1]) for i in range(5)], "not split: the whole job"
    app.close()


def test_in_partitions_refuses_nonsense():
    app = Celery("x", broker="memory://", set_as_current=False)
    sig = app.signature("t", args=(1,))
    with pytest.raises(ValueError, match="positive integer"):
        in_partitions(sig, 0)
    with pytest.raises(ValueError, match="already partitioned"):
        in_partitions(sig.clone(kwargs={PARTITION_KWARG: [0, 2]}), 2)
    app.close()
