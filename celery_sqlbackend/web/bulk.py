"""Retry or discard every failed job a filter matches, in the background, with progress.

Why a thread and not the request: a filter may match 100,000 jobs; the work
runs in batches of short transactions (``admin.retry_failed_all``), and the
browser watches a progress page instead of holding a request open.  Runs live
in this process only; a restart forgets finished runs (the jobs they moved
stay moved).
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

log = logging.getLogger("celery_sqlbackend.web")


@dataclass
class BulkRun:
    id: int
    action: str                   # "retry" or "discard"
    filters: dict[str, Any]
    total: int                    # matching when it started (new failures may add a few)
    done: int = 0
    finished: bool = False
    error: str | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def percent(self) -> int:
        if self.finished:
            return 100
        return min(99, int(100 * self.done / self.total)) if self.total else 0


class BulkRuns:
    """The background runs of one dashboard, by id (the latest ``keep`` are remembered)."""

    def __init__(self, keep: int = 50) -> None:
        self._runs: dict[int, BulkRun] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._keep = keep

    def get(self, run_id: int) -> BulkRun | None:
        return self._runs.get(run_id)

    def start(self, action: str, filters: Mapping[str, Any], total: int,
              work: Callable[[Callable[[int], None]], int]) -> BulkRun:
        """Run ``work(on_progress)`` on a thread; ``on_progress(n)`` adds ``n`` jobs done."""
        with self._lock:
            run = BulkRun(next(self._ids), action, dict(filters), total)
            self._runs[run.id] = run
            for old in sorted(self._runs)[:-self._keep]:
                del self._runs[old]

        def progress(n: int) -> None:
            run.done += n

        def body() -> None:
            try:
                run.done = work(progress)
            except Exception as exc:  # shown on the progress page; the batches done so far stay done
                log.exception("bulk %s of failed jobs stopped", action)
                run.error = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            finally:
                run.finished = True

        threading.Thread(target=body, name=f"sqlq-web-bulk-{run.id}", daemon=True).start()
        return run
