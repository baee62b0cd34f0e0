"""A throwaway MariaDB server (mariadb-install-db + mariadbd) in a temporary directory.

It listens on 127.0.0.1 on a free port; ``root`` connects over TCP without a password. As root the
server runs as the ``mysql`` system user (created if missing): mariadbd refuses to run as root.
Durable defaults (``innodb_flush_log_at_trx_commit=1``), as production would run.
"""
from __future__ import annotations

import atexit
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

from tests.support.servers import ServerUnavailable, free_port, os_user_for_server, run_checked, start_watchdog

__all__ = ["PrivateMariaDB", "find_mariadb"]

SEARCH = [os.environ.get("SQLQ_TEST_MARIADB_BINDIR", ""), "/usr/sbin", "/usr/bin", "/usr/local/bin",
          "/usr/local/mysql/bin"]


def _which(*names: str) -> Optional[str]:
    for name in names:
        found = shutil.which(name) or next((os.path.join(d, name) for d in SEARCH
                                            if d and os.access(os.path.join(d, name), os.X_OK)), None)
        if found:
            return found
    return None


def find_mariadb() -> tuple[str, str]:
    """(mariadbd, mariadb-install-db) paths, or ServerUnavailable saying what to install."""
    server = _which("mariadbd", "mysqld")
    install = _which("mariadb-install-db", "mysql_install_db")
    if not server or not install:
        raise ServerUnavailable("no mariadbd/mariadb-install-db found (PATH, /usr/sbin); install mariadb-server "
                                "or set SQLQ_TEST_MYSQL_URL")
    return server, install


class PrivateMariaDB:
    """Start with ``start()``, connect with ``url()``, end with ``destroy()`` (also run at exit of ``owner_pid``)."""

    SETTINGS = {
        "innodb-flush-log-at-trx-commit": "1",
        "max-connections": "500",
        "skip-name-resolve": None,
        "skip-log-bin": None,
        "character-set-server": "utf8mb4",
        "collation-server": "utf8mb4_unicode_ci",
    }

    def __init__(self, os_user: str = "mysql", settings: Optional[dict] = None, owner_pid: Optional[int] = None) -> None:
        self.mariadbd, self.install_db = find_mariadb()
        self.user, self.as_root = os_user_for_server(os_user)
        self.settings = {**self.SETTINGS, **(settings or {})}
        self.owner_pid = owner_pid or os.getpid()
        self.base = Path(tempfile.mkdtemp(prefix="sqlq-maria-", dir="/tmp" if os.path.isdir("/tmp") else None))
        self.data = self.base / "data"
        self.socket = self.base / "mysqld.sock"
        self.pidfile = self.base / "mysqld.pid"
        self.logfile = self.base / "error.log"
        self.port = 0
        self.proc: Optional[subprocess.Popen] = None
        self._watchdog: Optional[subprocess.Popen] = None
        if self.as_root:
            shutil.chown(self.base, user=self.user)
        if self.owner_pid == os.getpid():
            atexit.register(self.destroy)
        self._install()

    def url(self, database: str = "mysql") -> str:
        return f"mysql+pymysql://root@127.0.0.1:{self.port}/{database}"

    def _as_user(self) -> dict:
        if not self.as_root:
            return {}
        pw = pwd.getpwnam(self.user)
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MYSQL", "MARIADB"))}
        env.update(LC_ALL="C", LANG="C", HOME=str(self.base))
        return env

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return f"\n--- {self.logfile} ---\n{self.logfile.read_text(errors='replace')[-chars:]}"
        except OSError:
            return ""

    def _install(self) -> None:
        argv = [self.install_db, "--no-defaults", f"--datadir={self.data}", "--auth-root-authentication-method=normal",
                "--skip-test-db"]
        if self.as_root:
            argv.append(f"--user={self.user}")
        run_checked(argv, self.base, self._env(), 120)

    def _argv(self, port: int) -> list[str]:
        argv = [self.mariadbd, "--no-defaults", f"--datadir={self.data}", "--bind-address=127.0.0.1", f"--port={port}",
                f"--socket={self.socket}", f"--pid-file={self.pidfile}", f"--log-error={self.logfile}"]
        argv += [f"--{k}" if v is None else f"--{k}={v}" for k, v in self.settings.items()]
        return argv

    def stop_argv(self) -> list[str]:
        """The command that kills the server as a crash would (for whoever outlives this object)."""
        return ["sh", "-c", f"kill -KILL $(cat {self.pidfile}) 2>/dev/null"]

    def start(self, attempts: int = 5, timeout: float = 60.0) -> "PrivateMariaDB":
        """Start mariadbd (on a free port, retried if another process takes it) and wait until it answers."""
        for attempt in range(attempts):
            port = self.port or free_port()
            self.proc = subprocess.Popen(self._argv(port), cwd=self.base, env=self._env(), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True, **self._as_user())
            self.port = port
            if self._wait_answering(timeout):
                if self._watchdog is None:
                    self._watchdog = start_watchdog(self.owner_pid, self.stop_argv(), self.base, self._env())
                return self
            if attempt == attempts - 1 or "Address already in use" not in self.log_tail():
                raise ServerUnavailable(f"mariadbd did not start (exit {self.proc.poll()}){self.log_tail()}")
            self.port = 0
        raise AssertionError("unreachable")

    def _wait_answering(self, timeout: float) -> bool:
        import pymysql

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                pymysql.connect(host="127.0.0.1", port=self.port, user="root", connect_timeout=2).close()
                return True
            except pymysql.err.OperationalError:
                time.sleep(0.1)
        self.proc.kill()
        return False

    def stop(self, timeout: float = 60.0) -> None:
        """Shut the server down cleanly (SIGTERM) and wait for it to exit."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def destroy(self) -> None:
        if self._watchdog is not None:
            self._watchdog.kill()
            self._watchdog.wait()
            self._watchdog = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        shutil.rmtree(self.base, ignore_errors=True)
        atexit.unregister(self.destroy)
