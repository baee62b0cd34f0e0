"""The engine parameter: which database engines the suite runs on, their servers, a fresh database per test.

Every engine-level test takes ``db_url`` and runs once per selected engine, in the manner of River's
driver conformance suite; adding an engine is one entry here and one fixture in ``tests/conftest.py``.

    SQLQ_TEST_ENGINES     comma list of sqlite, postgres, mysql (default: all three)
    SQLQ_TEST_PG_URL      a PostgreSQL server whose user may CREATE DATABASE (postgresql+psycopg://...)
    SQLQ_TEST_MYSQL_URL   a MariaDB/MySQL server whose user may CREATE DATABASE (mysql+pymysql://...)

Without a URL, a private server is started for the test run, once: the first pytest-xdist worker that
needs it starts it under a file lock in the run's shared directory (``SQLQ_TEST_SHARED_DIR``, made by the
controlling pytest process) and writes down its URL; the others read it. The controlling process stops
it at the end (and a watchdog does, if that process is killed).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional

from sqlalchemy.engine import URL, make_url

from tests.support.servers import ServerUnavailable

__all__ = ["ENGINES", "DEFAULT_ENGINES", "URL_ENV", "selected_engines", "engine_params", "ConfiguredServerBroken",
           "session_server_url", "fresh_database", "stop_shared_servers", "SHARED_DIR_ENV", "ROOT_PID_ENV"]

ENGINES = ("sqlite", "postgres", "mysql")
DEFAULT_ENGINES = ENGINES
ENGINES_ENV = "SQLQ_TEST_ENGINES"
URL_ENV = {"postgres": "SQLQ_TEST_PG_URL", "mysql": "SQLQ_TEST_MYSQL_URL"}
SHARED_DIR_ENV = "SQLQ_TEST_SHARED_DIR"
ROOT_PID_ENV = "SQLQ_TEST_ROOT_PID"


def selected_engines() -> tuple[str, ...]:
    """The engines named by $SQLQ_TEST_ENGINES (in canonical order), or the default ones."""
    raw = os.environ.get(ENGINES_ENV, "").strip()
    if not raw:
        return DEFAULT_ENGINES
    names = {n.strip().lower() for n in raw.split(",") if n.strip()}
    unknown = names - set(ENGINES)
    if unknown:
        raise ValueError(f"{ENGINES_ENV}={raw!r}: unknown engine(s) {', '.join(sorted(unknown))}; "
                         f"choose from {', '.join(ENGINES)}")
    return tuple(e for e in ENGINES if e in names)


def engine_params() -> list:
    """pytest parameters, one per selected engine, each marked with the engine's name."""
    import pytest

    try:
        selected = selected_engines()
    except ValueError:   # tests/conftest.py reports it as a usage error
        selected = DEFAULT_ENGINES
    return [pytest.param(e, marks=getattr(pytest.mark, e)) for e in selected]


class ConfiguredServerBroken(RuntimeError):
    """A server URL was given explicitly and does not work: always an error, never a skip."""


# --- connections ---------------------------------------------------------------------------------

def _pg_connect(url: URL, **kwargs):
    import psycopg

    params = {"host": url.host, "port": url.port, "user": url.username, "password": url.password,
              "dbname": url.database or "postgres", **dict(url.query)}
    return psycopg.connect(**{k: v for k, v in params.items() if v is not None}, connect_timeout=10, **kwargs)


def _mysql_connect(url: URL):
    import pymysql

    from celery_sqlbackend.store import pymysql_tls

    connect = pymysql_tls.connection_class() or pymysql.connect   # (one TLS context per process, not per call)
    params = {"host": url.host or "127.0.0.1", "port": url.port or 3306, "user": url.username,
              "password": url.password or "", "database": url.database}
    return connect(**{k: v for k, v in params.items() if v is not None}, connect_timeout=10, autocommit=True)


def _check(engine: str, url: str) -> None:
    u = make_url(url)
    (_pg_connect if engine == "postgres" else _mysql_connect)(u).close()


# --- session servers -----------------------------------------------------------------------------

def _start_private(engine: str, owner_pid: int):
    if engine == "postgres":
        from tests.support.postgres import PrivatePostgres
        server = PrivatePostgres(owner_pid=owner_pid)
    else:
        from tests.support.mariadb import PrivateMariaDB
        server = PrivateMariaDB(owner_pid=owner_pid)
    try:
        return server.start()
    except BaseException:
        server.destroy()
        raise


def session_server_url(engine: str) -> str:
    """The URL of this run's server for ``engine`` (``postgres`` or ``mysql``).

    Raises ConfiguredServerBroken when $SQLQ_TEST_*_URL is set but unreachable, ServerUnavailable
    when no private server can be started.
    """
    configured = os.environ.get(URL_ENV[engine])
    if configured:
        url = configured.removeprefix("sqlq+")
        try:
            _check(engine, url)
        except Exception as exc:
            shown = make_url(url).render_as_string(hide_password=True)
            raise ConfiguredServerBroken(f"{URL_ENV[engine]}={shown} is not reachable: {exc}") from None
        return url
    shared = os.environ.get(SHARED_DIR_ENV)
    if not shared:   # outside the suite's pytest (a script): a server for this process only
        return _start_private(engine, os.getpid()).url()
    return _shared_private_url(engine, Path(shared), int(os.environ.get(ROOT_PID_ENV, os.getpid())))


def _shared_private_url(engine: str, shared: Path, owner_pid: int) -> str:
    state, error = shared / f"{engine}.json", shared / f"{engine}.error"
    with open(shared / f"{engine}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # released when the file closes
        if state.exists():
            return json.loads(state.read_text())["url"]
        if error.exists():
            raise ServerUnavailable(error.read_text())
        try:
            server = _start_private(engine, owner_pid)
        except (ServerUnavailable, OSError, subprocess.SubprocessError) as exc:
            error.write_text(str(exc))
            raise ServerUnavailable(str(exc)) from None
        state.write_text(json.dumps({"url": server.url(), "stop": server.stop_argv(), "base": str(server.base)}))
        return server.url()


def stop_shared_servers(shared: Path) -> None:
    """Stop the private servers the run's workers started (called by the controlling process at the end)."""
    for state in shared.glob("*.json"):
        info = json.loads(state.read_text())
        subprocess.run(info["stop"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        shutil.rmtree(info["base"], ignore_errors=True)


# --- a fresh database per test -------------------------------------------------------------------

def _pg_create(admin: URL, name: str) -> Callable[[], None]:
    with _pg_connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with _pg_connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')   # killed workers may hold connections
    return drop


def _mysql_create(admin: URL, name: str) -> Callable[[], None]:
    conn = _mysql_connect(admin)
    try:
        conn.cursor().execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
    finally:
        conn.close()

    def drop() -> None:
        # DROP DATABASE waits for every open transaction on its tables: end the connections still in it first
        # (ours or leaked by a test; a worker killed by the test may not have been noticed yet).
        conn = _mysql_connect(admin)
        try:
            cur = conn.cursor()
            cur.execute("SELECT id FROM information_schema.processlist WHERE db = %s AND id <> CONNECTION_ID()", (name,))
            for (thread_id,) in cur.fetchall():
                with contextlib.suppress(Exception):
                    cur.execute(f"KILL {int(thread_id)}")
            cur.execute("SET SESSION lock_wait_timeout = 60")
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        finally:
            conn.close()
    return drop


@contextlib.contextmanager
def fresh_database(engine: str, server_url: str, prefix: str = "sqlq_t") -> Iterator[str]:
    """A new, uniquely named database on ``server_url``, dropped on exit; yields its URL."""
    admin = make_url(server_url)
    name = f"{prefix}_{uuid.uuid4().hex[:16]}"
    drop: Optional[Callable[[], None]] = (_pg_create if engine == "postgres" else _mysql_create)(admin, name)
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        drop()
