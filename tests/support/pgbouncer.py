"""A throwaway PgBouncer in transaction pooling mode, in front of the run's PostgreSQL.

``SQLQ_TEST_PGBOUNCER_URL`` names one that is already running (``.ci/run`` starts it), in front of the
server of ``SQLQ_TEST_PG_URL``, forwarding every database name; otherwise one is started for the test run
(once, shared by the xdist workers as the private servers are, see ``engines.py``), in a temporary
directory, on 127.0.0.1 and a free port, as the unprivileged user PostgreSQL runs as (PgBouncer refuses
root). Its pools are small (``default_pool_size``), so that clients really share server connections and a
session setting or prepared statement left behind by one shows up in another.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

from sqlalchemy.engine import make_url

from tests.support.servers import ServerUnavailable, free_port, os_user_for_server, run_checked, start_watchdog

__all__ = ["PrivatePgBouncer", "URL_ENV", "bouncer_url_for", "find_pgbouncer", "session_bouncer_url"]

URL_ENV = "SQLQ_TEST_PGBOUNCER_URL"
#: Server connections per (database, user): few, so that every client shares them.
POOL_SIZE = 4


def find_pgbouncer() -> str:
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin:/usr/bin")
    if not found:
        raise ServerUnavailable("pgbouncer is not installed (Debian: apt-get install pgbouncer); "
                                f"or set {URL_ENV}")
    return found


class PrivatePgBouncer:
    """PgBouncer (pool_mode=transaction) on 127.0.0.1 in front of the PostgreSQL server at ``server_url``."""

    def __init__(self, server_url: str, os_user: str = "sqlqtest", owner_pid: Optional[int] = None) -> None:
        self.binary = find_pgbouncer()
        self.server = make_url(server_url)
        self.user, self.as_root = os_user_for_server(os_user)
        self.owner_pid = owner_pid or os.getpid()
        self.base = Path(tempfile.mkdtemp(prefix="sqlq-pgbouncer-", dir="/tmp" if os.path.isdir("/tmp") else None))
        self.port = 0
        self._watchdog: Optional[subprocess.Popen] = None
        if self.as_root:
            shutil.chown(self.base, user=self.user)

    @property
    def pidfile(self) -> Path:
        return self.base / "pgbouncer.pid"

    def url(self, database: str = "postgres") -> str:
        """The server's URL with PgBouncer's address, naming ``database`` (forwarded as it is)."""
        return self.server.set(host="127.0.0.1", port=self.port, database=database).render_as_string(
            hide_password=False)

    def _write_config(self) -> Path:
        login = self.server.username or self.user
        password = (self.server.password or "").replace('"', '""')
        users = self.base / "users.txt"
        users.write_text(f'"{login}" "{password}"\n')
        users.chmod(0o600)
        conf = self.base / "pgbouncer.ini"
        conf.write_text(
            "[databases]\n"
            f"* = host={self.server.host or '127.0.0.1'} port={self.server.port or 5432}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            f"unix_socket_dir = {self.base}\n"
            "auth_type = trust\n"                      # the password (if any) in users.txt logs in to the server
            f"auth_file = {users}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {POOL_SIZE}\n"
            "max_client_conn = 1000\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
            f"pidfile = {self.pidfile}\n"
            f"logfile = {self.base / 'pgbouncer.log'}\n")
        if self.as_root:
            for path in (users, conf):
                shutil.chown(path, user=self.user)
        return conf

    def _argv(self, *args: str) -> list[str]:
        argv = [self.binary, *args]
        return ["runuser", "-u", self.user, "--", *argv] if self.as_root else argv

    def stop_argv(self) -> list[str]:
        return ["sh", "-c", f"kill -TERM $(cat {self.pidfile}) 2>/dev/null"]

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return f"\n--- pgbouncer.log ---\n{(self.base / 'pgbouncer.log').read_text(errors='replace')[-chars:]}"
        except OSError:
            return ""

    def start(self, attempts: int = 5) -> "PrivatePgBouncer":
        for attempt in range(attempts):
            self.port = free_port()
            conf = self._write_config()
            env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
            try:
                run_checked(self._argv("-d", str(conf)), self.base, env, 30, self.log_tail())
                self._wait_accepting()
            except ServerUnavailable:
                subprocess.run(self.stop_argv(), timeout=30)
                if attempt == attempts - 1:
                    raise
                continue
            self._watchdog = start_watchdog(self.owner_pid, self.stop_argv(), self.base, env)
            return self
        raise AssertionError("unreachable")

    def _wait_accepting(self, timeout: float = 15.0) -> None:
        import psycopg

        u = make_url(self.url(self.server.database or "postgres"))
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(host=u.host, port=u.port, user=u.username, password=u.password or None,
                                dbname=u.database, connect_timeout=5).close()
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise ServerUnavailable(f"pgbouncer did not accept connections: {exc}{self.log_tail()}") from None
                time.sleep(0.1)

    def destroy(self) -> None:
        if self._watchdog is not None:
            self._watchdog.kill()
            self._watchdog.wait()
            self._watchdog = None
        subprocess.run(self.stop_argv(), timeout=30)
        shutil.rmtree(self.base, ignore_errors=True)


def bouncer_url_for(database_url: str, bouncer_url: str) -> str:
    """``database_url`` (a database on the run's PostgreSQL) reached through the PgBouncer at ``bouncer_url``,
    declared as transaction pooling (``?sqlq_pool_mode=transaction``)."""
    direct, bouncer = make_url(database_url), make_url(bouncer_url.removeprefix("sqlq+"))
    through = direct.set(host=bouncer.host, port=bouncer.port)
    return through.update_query_dict({"sqlq_pool_mode": "transaction"}).render_as_string(hide_password=False)


def session_bouncer_url(pg_server_url: str) -> str:
    """The run's PgBouncer: ``$SQLQ_TEST_PGBOUNCER_URL`` (checked), or a private one shared by the run's
    xdist workers (started under a file lock in the run's shared directory, stopped at the end)."""
    import fcntl
    import json

    from tests.support import engines

    configured = os.environ.get(URL_ENV)
    if configured:
        url = configured.removeprefix("sqlq+")
        try:
            engines._check("postgres", url)
        except Exception as exc:
            shown = make_url(url).render_as_string(hide_password=True)
            raise engines.ConfiguredServerBroken(f"{URL_ENV}={shown} is not reachable: {exc}") from None
        return url
    shared = os.environ.get(engines.SHARED_DIR_ENV)
    if not shared:   # outside the suite's pytest: one for this process only
        return PrivatePgBouncer(pg_server_url).start().url()
    shared_dir = Path(shared)
    state, error = shared_dir / "pgbouncer.json", shared_dir / "pgbouncer.error"
    with open(shared_dir / "pgbouncer.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if state.exists():
            return json.loads(state.read_text())["url"]
        if error.exists():
            raise ServerUnavailable(error.read_text())
        bouncer = PrivatePgBouncer(pg_server_url, owner_pid=int(os.environ.get(engines.ROOT_PID_ENV, os.getpid())))
        try:
            bouncer.start()
        except (ServerUnavailable, OSError, subprocess.SubprocessError) as exc:
            shutil.rmtree(bouncer.base, ignore_errors=True)
            error.write_text(str(exc))
            raise ServerUnavailable(str(exc)) from None
        state.write_text(json.dumps({"url": bouncer.url(), "stop": bouncer.stop_argv(), "base": str(bouncer.base)}))
        return bouncer.url()
