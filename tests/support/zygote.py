"""A fork server for ``celery`` processes: one-shot commands and workers.

Each ``celery`` process spends ~1.4 s of CPU importing Celery, SQLAlchemy, rich and the plugin before it
does anything, and the suite starts several hundred of them (every ``celery worker``, every
``celery sqlq …``): on a two-core machine that alone is minutes. The zygote imports those once, then
forks a child per request: a real process in its own session, with its own working directory,
environment, standard streams and exit status, running the real ``celery`` entry point
(``celery.__main__.main``) on the real argv, and ending like ``python -m celery`` does (atexit handlers
run). Only the imports are shared.

Not forked (started with exec by the callers): the eventlet and gevent pools (they must patch the
standard library before anything imports it), commands that must not see a preloaded module (a test that
hides a driver), and everything when ``SQLQ_TEST_EXEC=1``.
"""
from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence


__all__ = ["CeleryZygote", "ForkedProcess", "zygote", "forking_enabled"]

REPO = Path(__file__).resolve().parents[2]

#: Runs in the zygote process: preload, then fork one child per request line on stdin, and report
#: each child's pid at once and its exit status when it ends.
ZYGOTE = r'''
import json, os, select, sys, traceback
import celery.__main__, celery.bin.celery, celery.worker, celery.apps.worker  # noqa: F401  (preloaded)
import celery.concurrency.prefork, celery.concurrency.thread, kombu, sqlalchemy, click, rich  # noqa: F401
import celery_sqlbackend, celery_sqlbackend.cli, celery_sqlbackend.transport, celery_sqlbackend.backend  # noqa
if "mysql" in os.environ.get("SQLQ_TEST_ENGINES", ""):   # PyMySQL's TLS context, once for every child
    from celery_sqlbackend.store import pymysql_tls
    pymysql_tls.warm()
import gc
gc.freeze()   # the preloaded objects never collected in a child: its exit-time GC then copies no shared page

requests_fd, replies = os.dup(0), os.fdopen(os.dup(1), "w")


def send(message):
    replies.write(json.dumps(message) + "\n")
    replies.flush()


def child(req):
    """Become the requested ``celery`` process; returns its exit status."""
    os.close(requests_fd)
    replies.close()
    code = 1
    try:
        os.setsid()
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        extra = [p for p in req["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:0] = [req["cwd"], *extra]
        mode = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if req.get("append") else os.O_TRUNC)
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, req["stdout"], mode), (2, req["stderr"], mode)):
            opened = os.open(path, flags, 0o644)
            os.dup2(opened, fd)
            os.close(opened)
        sys.stdin = open(os.devnull)
        # SIGUSR2 dumps every thread's stack to the log, even from a thread stuck in C (a lock wait).
        import faulthandler, signal
        faulthandler.register(signal.SIGUSR2, all_threads=True)
        sys.argv = ["celery", *req["args"]]
        try:
            celery.__main__.main()
            code = 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    return code


pending, children = b"", set()
while True:
    readable, _, _ = select.select([requests_fd], [], [], 0.02 if children else None)
    if readable:
        chunk = os.read(requests_fd, 65536)
        if not chunk:
            break
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            req = json.loads(line)
            pid = os.fork()
            if pid == 0:
                sys.exit(child(req))    # (out of this loop: the interpreter ends as after `python -m celery`)
            children.add(pid)
            send({"pid": pid})
    for pid in list(children):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            children.discard(pid)
            send({"exit": pid, "status": os.waitstatus_to_exitcode(status)})
'''


def forking_enabled() -> bool:
    return not os.environ.get("SQLQ_TEST_EXEC")


class CeleryZygote:
    """The test process's fork server (``zygote()``): ``spawn`` a ``celery`` process, learn its exit."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], env=dict(env), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=None, bufsize=0, start_new_session=True)
        self.scratch = Path(tempfile.mkdtemp(prefix="sqlq-cli-"))
        self._pending = b""               # bytes read past the last message
        self._spawned: list[int] = []     # pids replied, not yet taken by ``spawn``
        self._exits: dict[int, int] = {}  # pid -> exit status
        self._lock = threading.Lock()
        atexit.register(self.close)

    def _read(self, timeout: float) -> bool:
        """Read and file the messages available within ``timeout``; False if none came."""
        fd = self.proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], max(0.0, timeout))
        if not ready:
            return False
        chunk = os.read(fd, 65536)
        if not chunk:
            raise RuntimeError(f"the celery zygote exited ({self.proc.poll()})")
        self._pending += chunk
        while b"\n" in self._pending:
            line, self._pending = self._pending.split(b"\n", 1)
            message = json.loads(line)
            if "exit" in message:
                self._exits[message["exit"]] = message["status"]
            else:
                self._spawned.append(message["pid"])
        return True

    def spawn(self, args: Sequence[str], cwd: Path, env: Mapping[str, str], stdout: Path, stderr: Path,
              append: bool = False) -> "ForkedProcess":
        request = {"args": list(args), "cwd": str(cwd), "env": dict(env), "stdout": str(stdout),
                   "stderr": str(stderr), "append": append}
        with self._lock:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            deadline = time.monotonic() + 30
            while not self._spawned:
                if not self._read(deadline - time.monotonic()) and time.monotonic() >= deadline:
                    raise RuntimeError("the celery zygote did not fork")
            return ForkedProcess(self, self._spawned.pop(0))

    def status(self, pid: int, timeout: float = 0.0) -> Optional[int]:
        """``pid``'s exit status, waiting up to ``timeout`` for it; None while it runs."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while pid not in self._exits:
                remaining = deadline - time.monotonic()
                if not self._read(remaining) and remaining <= 0:
                    return None
            return self._exits[pid]

    def run(self, args: Sequence[str], cwd: Path, env: Mapping[str, str], timeout: float) -> subprocess.CompletedProcess:
        """Like ``subprocess.run([python, -m, celery, *args], capture_output=True, text=True)``."""
        out, err = self.scratch / f"stdout-{os.getpid()}", self.scratch / f"stderr-{os.getpid()}"
        child = self.spawn(args, cwd, env, out, err)
        try:
            status = child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.kill_group()
            child.wait(30)
            raise
        argv = [sys.executable, "-m", "celery", *args]
        return subprocess.CompletedProcess(argv, status, out.read_text(errors="replace"), err.read_text(errors="replace"))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for path in self.scratch.glob("*"):
            path.unlink(missing_ok=True)
        self.scratch.rmdir() if self.scratch.exists() else None
        atexit.unregister(self.close)


class ForkedProcess:
    """A zygote's child, with the part of ``subprocess.Popen`` the tests use."""

    def __init__(self, zygote: CeleryZygote, pid: int) -> None:
        self.zygote = zygote
        self.pid = pid
        self.args = ["celery"]

    @property
    def returncode(self) -> Optional[int]:
        return self.zygote.status(self.pid)

    def poll(self) -> Optional[int]:
        return self.zygote.status(self.pid)

    def wait(self, timeout: Optional[float] = None) -> int:
        status = self.zygote.status(self.pid, 1e9 if timeout is None else timeout)
        if status is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return status

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def kill_group(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


_zygotes: dict[int, CeleryZygote] = {}   # one per test process (keyed by pid: never a forked parent's)


def zygote() -> CeleryZygote:
    """This test process's zygote, started on first use."""
    found = _zygotes.get(os.getpid())
    if found is None or found.proc.poll() is not None:
        path = os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p)
        env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        found = _zygotes[os.getpid()] = CeleryZygote(env)
    return found
