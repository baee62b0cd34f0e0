"""Fixtures for the operations tests: a test app on the database, and the real ``celery`` CLI.

One-shot commands run in children forked from a process that has already imported Celery and the plugin
(tests/support/zygote.py): the real entry point in a real process, without 1.4 s of imports each.
``SQLQ_TEST_EXEC=1`` runs them with exec instead.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from tests.harness import REPO, write_app
from tests.support.zygote import forking_enabled, zygote

TASKS = '''
import os, time

@app.task
def add(x, y):
    return x + y

@app.task
def touch(path):
    with open(path, "w") as f:
        f.write("ran")
    return path

@app.task
def boom():
    raise RuntimeError("boom")
'''

#: Fast polling, and tables created on first use on PostgreSQL too (the
#: migrate-first path is tested in test_sqlq_cli / test_migrations).
TRANSPORT_OPTIONS = {"polling_interval": 0.2, "create_tables": True}


class Started(NamedTuple):
    """A command ``Cli.start`` left running: its argv, process and output files."""
    argv: list[str]
    proc: Any
    out: Path
    err: Path


class Cli:
    """Runs ``python -m celery -A testapp …`` in the app's directory, as an operator would."""

    def __init__(self, directory: Path, app: str = "testapp"):
        self.directory = Path(directory)
        self.app = app
        path = [str(self.directory), str(REPO), os.environ.get("PYTHONPATH", "")]
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p), "PYTHONUNBUFFERED": "1",
                    "COLUMNS": "200"}

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "celery", "-A", self.app, *args]

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        if not forking_enabled():
            out = subprocess.run(self.argv(*args), cwd=self.directory, env=self.env, capture_output=True,
                                 text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        else:
            out = zygote().run(["-A", self.app, *args], self.directory, self.env, timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"celery {' '.join(args)} exited {out.returncode}\n"
                                 f"--- stdout ---\n{out.stdout}\n--- stderr ---\n{out.stderr}")
        return out

    def start(self, *args: str) -> "Started":
        """Start a command without waiting for it (``finish`` collects it): a client that waits out its
        ``--timeout`` while the test goes on."""
        out, err = (self.directory / f".cli-{os.getpid()}-{time.monotonic_ns()}.{name}" for name in ("out", "err"))
        if forking_enabled():
            proc = zygote().spawn(["-A", self.app, *args], self.directory, self.env, out, err)
        else:
            with open(out, "wb") as stdout, open(err, "wb") as stderr:
                proc = subprocess.Popen(self.argv(*args), cwd=self.directory, env=self.env, stdin=subprocess.DEVNULL,
                                        stdout=stdout, stderr=stderr, start_new_session=True)
        return Started(self.argv(*args), proc, out, err)

    def finish(self, started: "Started", check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Wait for a ``start``ed command (killed if it outlives ``timeout``) and return what it printed."""
        try:
            status = started.proc.wait(timeout)
        finally:
            if started.proc.poll() is None:
                os.killpg(started.proc.pid, signal.SIGKILL)
        out = subprocess.CompletedProcess(started.argv, status, started.out.read_text(errors="replace"),
                                          started.err.read_text(errors="replace"))
        started.out.unlink()
        started.err.unlink()
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(started.argv[2:])} exited {out.returncode}\n"
                                 f"--- stdout ---\n{out.stdout}\n--- stderr ---\n{out.stderr}")
        return out

    def run_together(self, *commands: tuple[str, ...], check: bool = True,
                     timeout: float = 60) -> list[subprocess.CompletedProcess]:
        """Run several commands at once (each a real process, as separate operators would) and return their
        results in order. Commands that each wait out a ``--timeout`` cost one timeout together."""
        started: list[Started] = []
        try:
            for args in commands:
                started.append(self.start(*args))
        finally:
            results = [self.finish(s, check=False, timeout=timeout) for s in started]
        for args, out in zip(commands, results):
            if check and out.returncode != 0:
                raise AssertionError(f"celery {' '.join(args)} exited {out.returncode}\n"
                                     f"--- stdout ---\n{out.stdout}\n--- stderr ---\n{out.stderr}")
        return results

    def json(self, *args: str, check: bool = True):
        out = self.run(*args, "--json", check=check)
        try:
            return json.loads(out.stdout)
        except ValueError:
            raise AssertionError(f"celery {' '.join(args)} --json printed no JSON:\n{out.stdout}\n{out.stderr}")

    def popen(self, *args: str, log: Path) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*args), cwd=self.directory, env=self.env, stdin=subprocess.DEVNULL,
                                stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture
def make_app(tmp_path):
    """``make_app(db_url, **conf)`` writes ``testapp.py`` on the database and returns its Cli."""
    def make(db_url: str, transport_options: dict | None = None, **conf) -> Cli:
        options = {**TRANSPORT_OPTIONS, **(transport_options or {})}
        write_app(tmp_path, f"sqlq+{db_url}", extra_conf={"broker_transport_options": options, **conf},
                  tasks_source=TASKS)
        return Cli(tmp_path)
    return make


@pytest.fixture
def procs():
    """Extra subprocesses (celery events, flower) killed with their group at teardown."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait(10)
