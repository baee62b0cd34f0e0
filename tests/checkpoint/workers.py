"""A minimal harness for real ``celery worker`` subprocesses running ``ckapp``.

Synchronisation is by polling durable state with deadlines (``wait_until``),
never by sleeping a fixed time and hoping.
"""
from __future__ import annotations

from tests import harness

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CELERY = str(Path(sys.executable).with_name("celery"))


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05,
               message: str = "condition") -> Any:
    """The shared poll-with-deadline, with this suite's longer default timeout."""
    return harness.wait_until(predicate, timeout=timeout, interval=interval, message=message)


class Items:
    """Read-only view of ckapp's items.sqlite3."""

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


class Worker:
    """One ``celery -A ckapp worker`` process (its own session, so cleanup can kill the group)."""

    def __init__(self, directory: Path, pool: str = "prefork", concurrency: int = 1,
                 env: Optional[dict] = None, name: str = "ck") -> None:
        self.directory = directory
        self.items = Items(directory)
        self.log_path = directory / f"worker-{name}-{time.monotonic_ns()}.log"
        # $PYTHONPATH first: it may point at a pinned copy of celery_sqlbackend.
        full_env = {**os.environ, "CK_DIR": str(directory),
                    "PYTHONPATH": os.pathsep.join(p for p in [os.environ.get("PYTHONPATH", ""), str(HERE), str(REPO)] if p),
                    **(env or {})}
        full_env.pop("CHECKPOINT_STOPFLAG", None)
        cmd = [CELERY, "-A", "ckapp", "worker", "-P", pool, "-c", str(concurrency), "-n", f"{name}@%h",
               "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"]
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=str(directory), env=full_env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 30.0) -> "Worker":
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.output()}")
            return self.items.mark(f"ready:{self.pid}")
        wait_until(ready, timeout, 0.05, "worker ready")
        return self

    def signal(self, signum: int) -> float:
        """Send ``signum`` to the main process only; return the wall-clock time it was sent."""
        at = time.time()
        os.kill(self.pid, signum)
        return at

    def wait_exit(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker did not exit in {timeout}s:\n{self.output()}") from None

    def kill_group(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]
