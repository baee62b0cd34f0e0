"""Pieces every throwaway database server of the suite needs: a free port, an unprivileged OS user
(PostgreSQL and MariaDB refuse to run as root), and a watchdog that stops the server and deletes
its directory when the process that owns it dies without cleaning up (SIGKILL, a CI timeout).
"""
from __future__ import annotations

import os
import pwd
import shlex
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Sequence

__all__ = ["ServerUnavailable", "free_port", "ensure_os_user", "os_user_for_server", "start_watchdog", "run_checked"]


class ServerUnavailable(RuntimeError):
    """No server of this kind can be started here (no binaries, no usable user, ...)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (callers retry if another process takes it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_os_user(name: str) -> None:
    """Create the system user ``name`` if it is missing (root only)."""
    try:
        pwd.getpwnam(name)
        return
    except KeyError:
        pass
    if not shutil.which("useradd"):
        raise ServerUnavailable(f"running as root, user {name!r} is missing and useradd is not available")
    out = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                         capture_output=True, text=True, timeout=30)
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise ServerUnavailable(f"could not create user {name!r}: {out.stderr.strip()}") from None


def os_user_for_server(root_user: str) -> tuple[str, bool]:
    """(user the server runs as, whether commands need ``runuser``): ``root_user`` as root, else ourselves."""
    if os.geteuid() == 0:
        if not shutil.which("runuser"):
            raise ServerUnavailable("running as root and runuser is not available")
        ensure_os_user(root_user)
        return root_user, True
    return pwd.getpwuid(os.geteuid()).pw_name, False


def run_checked(argv: Sequence[str], cwd: Path, env: dict, timeout: float, log_tail: str = "") -> subprocess.CompletedProcess:
    """Run ``argv``; a non-zero exit is a ServerUnavailable carrying its output."""
    out = subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise ServerUnavailable(f"{' '.join(argv)} failed ({out.returncode}):\n{out.stdout}{out.stderr}{log_tail}")
    return out


def start_watchdog(owner_pid: int, stop_argv: Sequence[str], base: Path, env: dict) -> subprocess.Popen:
    """A detached shell that waits for ``owner_pid`` to die, then runs ``stop_argv`` and removes ``base``."""
    stop = " ".join(shlex.quote(a) for a in stop_argv)
    script = (f"while kill -0 {owner_pid} 2>/dev/null; do sleep 1; done; "
              f"{stop} >/dev/null 2>&1; rm -rf {shlex.quote(str(base))}")
    return subprocess.Popen(["sh", "-c", script], cwd="/", env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
