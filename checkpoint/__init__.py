"""Resumable iterative Celery tasks, in the style of Shopify's job-iteration.

A task walks an enumerator of ``(item, cursor)`` pairs.  When the worker is
asked to stop, when the run has lasted ``max_job_runtime``, or when a throttle
says so, it re-enqueues itself with its cursor and ends; the next run resumes
after the last processed item.  Cursors are also saved durably every few
iterations, so even a killed run loses little work.

Example::

    from checkpoint import IterativeTask

    class Backfill(IterativeTask):
        name = "shop.backfill"

        def build_enumerator(self, account_id, *, cursor=None):
            return self.enumerate.integers(0, 10_000, cursor=cursor)

        def each_iteration(self, n, account_id):
            ...

    backfill = app.register_task(Backfill())
    backfill.delay(42)
"""
from __future__ import annotations

from . import enumerators
from .cursor import CursorNotSerializableError, InvalidCursorError, Progress, validate_cursor
from .enumerators import Enumerators
from .integration import install
from .interruption import FLAG, StopFlag, stopping
from .interruption import lookup as lookup_adapter
from .interruption import register as register_adapter
from .interruption import unregister as unregister_adapter
from .store import CheckpointTableMissingError, CursorStore, MemoryStore, NullStore, SQLCursorStore
from .task import IterativeTask
from .throttling import throttle_on
from .decorator import iterative_task

__all__ = [
    "IterativeTask", "iterative_task", "throttle_on",
    "stopping", "FLAG", "StopFlag",
    "register_adapter", "unregister_adapter", "lookup_adapter",
    "install",
    "enumerators", "Enumerators",
    "Progress", "CursorNotSerializableError", "InvalidCursorError", "validate_cursor",
    "CursorStore", "NullStore", "MemoryStore", "SQLCursorStore", "CheckpointTableMissingError",
]
