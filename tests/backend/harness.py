"""A small harness for real ``celery worker`` subprocesses running ``beapp``."""
from __future__ import annotations

from tests import harness

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CELERY = str(Path(sys.executable).with_name("celery"))


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05,
               message: str = "condition") -> Any:
    """The shared poll-with-deadline, with this suite's longer default timeout."""
    return harness.wait_until(predicate, timeout=timeout, interval=interval, message=message)


class Worker:
    """One ``celery -A beapp worker`` (prefork) in its own session."""

    def __init__(self, directory: Path, db_url: str, concurrency: int = 2, env: dict | None = None):
        self.log_path = directory / f"worker-{time.monotonic_ns()}.log"
        full_env = {**os.environ, "BE_DB": db_url,
                    "PYTHONPATH": os.pathsep.join(p for p in [str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")] if p),
                    **(env or {})}
        cmd = [CELERY, "-A", "beapp", "worker", "-P", "prefork", "-c", str(concurrency), "-n", f"be{time.monotonic_ns()}@%h",
               "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"]
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=str(HERE), env=full_env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, app, timeout: float = 60.0) -> "Worker":
        """Ready = a task sent now comes back through broker and result backend."""
        result = app.send_task("beapp.ping")
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.output()}")
            try:
                assert result.get(timeout=1.0) == "pong"
                return self
            except Exception as exc:
                if "timed out" not in str(exc).lower() or time.monotonic() > deadline:
                    raise AssertionError(f"worker not ready ({exc!r}):\n{self.output()}") from exc

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(10)
        self.log.close()

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-8000:]
