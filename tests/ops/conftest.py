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

    def run_together(self, *commands: tuple[str, ...], timeout: float = 60) -> list[subprocess.CompletedProcess]:
        """Run several commands at once (each a real process, as separate operators would) and return their
        results in order. Commands that each wait out a ``--timeout`` cost one timeout together."""
        started = []
        try:
            for i, args in enumerate(commands):
                out, err = (self.directory / f".together-{os.getpid()}-{i}.{name}" for name in ("out", "err"))
                if forking_enabled():
                    proc = zygote().spawn(["-A", self.app, *args], self.directory, self.env, out, err)
                else:
                    with open(out, "wb") as stdout, open(err, "wb") as stderr:
                        proc = subprocess.Popen(self.argv(*args), cwd=self.directory, env=self.env,
                                                stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                                start_new_session=True)
                started.append((args, proc, out, err))
            deadline = time.monotonic() + timeout
            statuses = [proc.wait(max(0.0, deadline - time.monotonic())) for _, proc, _, _ in started]
        finally:
            for _, proc, _, _ in started:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
        results = []
        for (args, _, out, err), status in zip(started, statuses):
            results.append(subprocess.CompletedProcess(self.argv(*args), status, out.read_text(errors="replace"),
                                                       err.read_text(errors="replace")))
            out.unlink()
            err.unlink()
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
