"""A fork server for one-shot ``celery`` commands (``celery -A testapp sqlq status`` and the like).

Each such command spends ~1.4 s of CPU importing Celery, SQLAlchemy, rich and the plugin before doing
a few milliseconds of work, and the operations tests run a hundred of them. The zygote imports those
once, then forks a child per command: a real process with its own session, working directory,
environment, standard streams and exit status, running the real ``celery`` entry point
(``celery.__main__.main``) on the real argv. Only the imports are shared. Long-running commands
(``celery events``, ``flower``) are still started with exec.
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
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["CeleryCommandZygote"]

#: Runs in the zygote process: preload, then fork one child per request line on stdin.
ZYGOTE = r'''
import json, os, sys, traceback
import celery.__main__, celery.bin.celery, kombu, sqlalchemy, click, rich  # noqa: F401  (preloaded)
import celery_sqlbackend, celery_sqlbackend.cli  # noqa: F401

protocol_in, protocol_out = sys.stdin, os.fdopen(os.dup(1), "w")


def child(req):
    code = 1
    try:
        os.setsid()
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        extra = [p for p in req["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:0] = [req["cwd"], *extra]
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, req["stdout"], os.O_WRONLY | os.O_TRUNC),
                                (2, req["stderr"], os.O_WRONLY | os.O_TRUNC)):
            opened = os.open(path, flags)
            os.dup2(opened, fd)
            os.close(opened)
        sys.stdin = open(os.devnull)
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
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


for line in protocol_in:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        protocol_out.close()
        child(req)
    protocol_out.write(json.dumps({"pid": pid}) + "\n")
    protocol_out.flush()
    _, status = os.waitpid(pid, 0)
    protocol_out.write(json.dumps({"status": os.waitstatus_to_exitcode(status)}) + "\n")
    protocol_out.flush()
'''


class CeleryCommandZygote:
    """One zygote per test process; ``run()`` behaves like ``subprocess.run([python, -m, celery, ...])``."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], env=dict(env), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=None, bufsize=0, start_new_session=True)
        self.scratch = Path(tempfile.mkdtemp(prefix="sqlq-cli-"))
        self._pending = b""   # bytes read past the last reply line
        atexit.register(self.close)

    def _reply(self, timeout: float) -> dict:
        """The zygote's next reply line (read unbuffered, so that select() sees what is still to come)."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._pending:
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                raise TimeoutError
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"the celery command zygote exited ({self.proc.poll()})")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)

    def run(self, args: Sequence[str], cwd: Path, env: Mapping[str, str], timeout: float) -> subprocess.CompletedProcess:
        out, err = self.scratch / "stdout", self.scratch / "stderr"
        out.write_bytes(b"")
        err.write_bytes(b"")
        request = {"args": list(args), "cwd": str(cwd), "env": dict(env), "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        pid = self._reply(30)["pid"]
        try:
            status = self._reply(timeout)["status"]
        except TimeoutError:
            os.killpg(pid, signal.SIGKILL)
            self._reply(30)
            raise subprocess.TimeoutExpired(["celery", *args], timeout) from None
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
        for name in ("stdout", "stderr"):
            (self.scratch / name).unlink(missing_ok=True)
        self.scratch.rmdir() if self.scratch.exists() else None
        atexit.unregister(self.close)
