"""A throwaway PostgreSQL cluster (initdb/pg_ctl) in a temporary directory, for tests and benchmarks."""
from __future__ import annotations

import atexit
import glob
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

from tests.support.servers import ServerUnavailable, free_port, os_user_for_server, run_checked, start_watchdog

__all__ = ["PrivatePostgres", "find_pg_bindir"]


def find_pg_bindir() -> str:
    """A directory holding initdb, pg_ctl and postgres: $SQLQ_TEST_PG_BINDIR, PATH, pg_config, Debian layout."""
    candidates = [os.environ.get("SQLQ_TEST_PG_BINDIR", "")]
    which = shutil.which("pg_ctl")
    if which:
        candidates.append(os.path.dirname(os.path.realpath(which)))
    if shutil.which("pg_config"):
        try:
            out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10)
            candidates.append(out.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass

    def version(path: str) -> tuple:
        return tuple(int(n) for n in re.findall(r"\d+", path)[:2])
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    candidates += ["/usr/local/pgsql/bin"]
    for d in candidates:
        if d and all(os.access(os.path.join(d, exe), os.X_OK) for exe in ("initdb", "pg_ctl", "postgres")):
            return d
    raise ServerUnavailable("no initdb/pg_ctl/postgres found (PATH, pg_config --bindir, /usr/lib/postgresql/*/bin); "
                            "install PostgreSQL or set SQLQ_TEST_PG_URL")


class PrivatePostgres:
    """A throwaway PostgreSQL cluster in a temporary directory, listening on 127.0.0.1 with trust auth.

    As root, the server runs as ``os_user`` (created if missing), since PostgreSQL refuses to run as root.
    The port is kept across ``stop()``/``start()``, so ``url`` stays valid; ``stop(mode="immediate")``
    simulates a crash. It is destroyed when ``owner_pid`` (default: this process) exits.
    """

    SETTINGS = {
        "listen_addresses": "'127.0.0.1'",
        "max_connections": "300",
        "fsync": "off",
        "full_page_writes": "off",
        "synchronous_commit": "off",
        "log_min_messages": "warning",
    }

    def __init__(self, os_user: str = "sqlqtest", bindir: Optional[str] = None, settings: Optional[dict] = None,
                 owner_pid: Optional[int] = None) -> None:
        self.bindir = bindir or find_pg_bindir()
        self.user, self.as_root = os_user_for_server(os_user)
        self.settings = {**self.SETTINGS, **(settings or {})}
        self.owner_pid = owner_pid or os.getpid()
        self.base = Path(tempfile.mkdtemp(prefix="sqlq-pg-", dir="/tmp" if os.path.isdir("/tmp") else None))
        self.data = self.base / "data"
        self.logfile = self.base / "postgres.log"
        self.port = 0
        self.running = False
        self._watchdog: Optional[subprocess.Popen] = None
        if self.as_root:
            shutil.chown(self.base, user=self.user)
        if self.owner_pid == os.getpid():
            atexit.register(self.destroy)
        self._initdb()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def _argv(self, *args: str) -> list[str]:
        argv = [os.path.join(self.bindir, args[0]), *args[1:]]
        return ["runuser", "-u", self.user, "--", *argv] if self.as_root else argv

    def stop_argv(self) -> list[str]:
        """The command that stops the server as a crash would (for whoever outlives this object)."""
        return self._argv("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")

    @staticmethod
    def _env() -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        return env

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return run_checked(self._argv(*args), self.base, self._env(), timeout, self.log_tail())

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return f"\n--- {self.logfile} ---\n{self.logfile.read_text(errors='replace')[-chars:]}"
        except OSError:
            return ""

    def _initdb(self) -> None:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", self.user, "--no-locale", "-E", "UTF8",
                  "--no-sync")
        extra = "".join(f"{k} = {v}\n" for k, v in self.settings.items())
        with open(self.data / "postgresql.conf", "a") as conf:  # appending keeps the server user's ownership
            conf.write(f"\n# tests.support.postgres.PrivatePostgres\nunix_socket_directories = '{self.base}'\n{extra}")

    def start(self, attempts: int = 5) -> "PrivatePostgres":
        """Start the server (choosing a free port the first time) and wait until it accepts connections."""
        for attempt in range(attempts):
            port = self.port or free_port()
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-o", f"-p {port}",
                          "-w", "-t", "60", "start")
            except ServerUnavailable:
                # Another process may have taken the port between free_port() and bind(): retry on a new one.
                if self.port or attempt == attempts - 1:
                    raise
                continue
            self.port = port
            self.running = True
            if self._watchdog is None:
                self._watchdog = start_watchdog(self.owner_pid, self.stop_argv(), self.base, self._env())
            return self
        raise AssertionError("unreachable")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` disconnects clients cleanly, ``immediate`` is a crash."""
        if self.running:
            self.running = False
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def destroy(self) -> None:
        if self._watchdog is not None:
            self._watchdog.kill()
            self._watchdog.wait()
            self._watchdog = None
        try:
            self.stop("immediate")
        except (ServerUnavailable, OSError, subprocess.SubprocessError):
            pass
        shutil.rmtree(self.base, ignore_errors=True)
        atexit.unregister(self.destroy)
