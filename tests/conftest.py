"""Shared fixtures: database URLs (SQLite always, PostgreSQL when one can be had) and worker cleanup.

PostgreSQL comes from ``$SQLQ_TEST_PG_URL`` (a SQLAlchemy URL whose user may CREATE DATABASE), or else
from a private server started with initdb/pg_ctl for the session. When neither works the PostgreSQL
tests are skipped loudly, except under ``$CI``, where they fail.

Fixtures:
    sqlite_url   sqlite:///<tmp_path>/jobs.sqlite3
    pg_url       session-wide server URL (database "postgres"); prefer pg_db_url in tests
    pg_db_url    a fresh, uniquely named database for this test, dropped afterwards
    db_url       parametrised: sqlite_url, then pg_db_url (marked ``postgres``)
    private_pg   a dedicated PrivatePostgres for this test (stop()/start()/restart() the database)
    spawn_worker factory: spawn_worker(directory, **CeleryWorker kwargs) -> ready worker; all killed at teardown
"""
from __future__ import annotations

import os
import signal
import threading
import uuid

import pytest

from tests.harness import CeleryWorker, PostgresUnavailable, PrivatePostgres

PG_FIXTURES = {"pg_url", "pg_db_url", "private_pg"}
_pg_problem: list[str] = []  # why PostgreSQL tests could not run (for the terminal summary)


def _no_postgres(reason: str):
    if reason not in _pg_problem:
        _pg_problem.append(reason)
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL is required under CI but unavailable: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL unavailable (set SQLQ_TEST_PG_URL or install PostgreSQL): {reason}")


def _connect(url: str, **kwargs):
    """A psycopg connection for a SQLAlchemy URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    params = {"host": u.host, "port": u.port, "user": u.username, "password": u.password,
              "dbname": u.database or "postgres", **dict(u.query)}
    return psycopg.connect(**{k: v for k, v in params.items() if v is not None}, connect_timeout=10, **kwargs)


def _start_private_server() -> PrivatePostgres:
    server = None
    try:
        server = PrivatePostgres()
        return server.start()
    except (PostgresUnavailable, OSError) as exc:
        if server is not None:
            server.destroy()
        _no_postgres(str(exc))


@pytest.fixture(scope="session")
def pg_url():
    """URL of a PostgreSQL server for the whole session: $SQLQ_TEST_PG_URL or a private initdb server."""
    configured = os.environ.get("SQLQ_TEST_PG_URL")
    if configured:
        url = configured.removeprefix("sqlq+")
        try:
            _connect(url).close()
        except Exception as exc:  # an explicit setting that does not work is always an error
            pytest.fail(f"SQLQ_TEST_PG_URL={configured!r} is not reachable: {exc}", pytrace=False)
        yield url
        return
    server = _start_private_server()
    yield server.url()
    server.destroy()


@pytest.fixture
def pg_db_url(pg_url):
    """A fresh PostgreSQL database for this test only (CREATE DATABASE, then DROP ... WITH (FORCE))."""
    from sqlalchemy.engine import make_url

    name = f"sqlq_t_{uuid.uuid4().hex[:16]}"
    with _connect(pg_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    with _connect(pg_url, autocommit=True) as conn:
        # FORCE: workers killed by the test may still hold connections.
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def private_pg():
    """A dedicated, started PrivatePostgres (``.url()``, ``.stop(mode)``, ``.start()``, ``.restart()``)."""
    server = _start_private_server()
    yield server
    server.destroy()


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path}/jobs.sqlite3"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request):
    """Each test using it runs twice: on a SQLite file, and on a fresh PostgreSQL database."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_db_url")


@pytest.fixture
def spawn_worker():
    """``spawn_worker(directory, **kwargs)`` starts a CeleryWorker and waits until it is ready.

    Pass ``ready_timeout=`` to change the wait, or ``wait=False`` to skip it. Every worker's
    process group is SIGKILLed at teardown.
    """
    started: list[CeleryWorker] = []

    def spawn(directory, wait: bool = True, ready_timeout: float = 30.0, **kwargs) -> CeleryWorker:
        worker = CeleryWorker(directory, **kwargs)
        started.append(worker)
        return worker.wait_ready(ready_timeout) if wait else worker

    yield spawn
    for worker in started:
        worker.close()


def pytest_configure(config):
    # Python's default SIGTERM action skips all cleanup; as KeyboardInterrupt, teardown still runs
    # (workers are killed, private servers stopped) when e.g. `timeout` ends the run.
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if PG_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.postgres)


def pytest_report_header(config):
    if os.environ.get("SQLQ_TEST_PG_URL"):
        return "postgres: SQLQ_TEST_PG_URL"
    return "postgres: private initdb/pg_ctl server (started on first use)"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for reason in _pg_problem:
        terminalreporter.write_sep("!", "PostgreSQL tests did NOT run", red=True, bold=True)
        terminalreporter.write_line(reason, red=True)
        terminalreporter.write_line("Set SQLQ_TEST_PG_URL=postgresql+psycopg://user@host:port/db or install "
                                    "PostgreSQL (initdb/pg_ctl); .ci/run does both.", red=True)
