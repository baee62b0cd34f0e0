"""Real ``celery worker`` processes running ``ckapp`` (tests/checkpoint/ckapp.py), and what their tasks record.

Synchronisation is by polling durable state with deadlines (``tests.harness.wait_until``).
"""
from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Optional

import pytest

from tests.harness import CeleryWorker

HERE = Path(__file__).resolve().parent


class Items:
    """Read-only view of ckapp's items.sqlite3 (what the tasks processed, their runs and marks)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "items.sqlite3"

    def query(self, sql: str, *params: Any) -> list:
        if not self.path.exists():
            return []
        conn = sqlite3.connect(self.path, timeout=30)
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:  # table not created yet
            if "no such table" in str(exc):
                return []
            raise
        finally:
            conn.close()

    def count(self) -> int:
        rows = self.query("SELECT count(*) FROM items")
        return rows[0][0] if rows else 0

    def duplicates(self) -> list:
        return self.query("SELECT item, times FROM items WHERE times > 1 ORDER BY item")

    def runs(self) -> list[dict]:
        cols = ["task_id", "event", "pid", "cursor", "iterations", "times_interrupted", "retries", "at"]
        return [dict(zip(cols, r)) for r in self.query(f"SELECT {', '.join(cols)} FROM runs ORDER BY seq")]

    def mark(self, name: str) -> Optional[tuple]:
        rows = self.query("SELECT at, pid FROM marks WHERE name = ?", name)
        return rows[0] if rows else None


class CheckpointWorker(CeleryWorker):
    """A CeleryWorker running ``ckapp`` in ``directory`` (CK_DIR), with ``items`` to read what it did."""

    def __init__(self, directory: Path, pool: str = "prefork", concurrency: int = 1,
                 env: Optional[dict] = None, name: str = "ck") -> None:
        super().__init__(directory, app="ckapp", app_dir=HERE, pool=pool, concurrency=concurrency,
                         hostname=f"{name}@%h", extra_args=["--without-heartbeat"],
                         env={"CK_DIR": str(directory), "CHECKPOINT_STOPFLAG": None, **(env or {})})
        self.items = Items(Path(directory))


@pytest.fixture
def workers(tmp_path):
    """Start workers with ``workers.start(pool=...)``; every one is killed (with its group) at the end."""
    started: list[CheckpointWorker] = []

    class Factory:
        directory = tmp_path
        items = Items(tmp_path)
        #: Environment every worker gets (a test module may set it: the broker of its engine).
        env: dict = {}

        def start(self, pool: str = "prefork", env: Optional[dict] = None, **kwargs) -> CheckpointWorker:
            worker = CheckpointWorker(tmp_path, pool=pool, env={**self.env, **(env or {})}, **kwargs)
            started.append(worker)
            return worker.wait_ready(30)

    yield Factory()
    for worker in started:
        worker.close()
