"""Shared fixtures: the engine parameter, a fresh database per test on every engine, and worker cleanup.

Engine-level tests take ``db_url`` and run once per selected engine (``$SQLQ_TEST_ENGINES``, default
``sqlite,postgres,mysql``). A server engine uses ``$SQLQ_TEST_PG_URL`` /
``$SQLQ_TEST_MYSQL_URL`` or else a private server started once for the run (see tests/support/engines.py).
When neither works its tests are skipped loudly, except under ``$CI``, where they fail. The last lines of
the run count the tests of each engine.

Fixtures:
    db_url        parametrised over the selected engines: a SQLite file, a fresh PostgreSQL or MariaDB database
    sqlite_url    sqlite:///<tmp_path>/jobs.sqlite3
    pg_url        the run's PostgreSQL server (database "postgres"); prefer pg_db_url in tests
    pg_db_url     a fresh, uniquely named PostgreSQL database for this test, dropped afterwards
    mysql_url     the run's MariaDB server; prefer mysql_db_url
    mysql_db_url  a fresh MariaDB database for this test, dropped afterwards
    private_pg    a dedicated PrivatePostgres for this test (stop()/start()/restart() the database)
    pgbouncer_url the run's PgBouncer (transaction pooling) in front of pg_url: $SQLQ_TEST_PGBOUNCER_URL or private
    pgbouncer_db  a fresh PostgreSQL database: ``.direct`` (its URL) and ``.through`` (via PgBouncer, declared)
    spawn_worker  factory: spawn_worker(directory, **CeleryWorker kwargs) -> ready worker; all killed at teardown
"""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.harness import CeleryWorker
from tests.support import engines, pgbouncer
from tests.support.postgres import PrivatePostgres
from tests.support.servers import ServerUnavailable
from tests.support.summary import UNAVAILABLE, tag_engine, write_engine_summary

try:
    SELECTED = engines.selected_engines()
    _ENGINE_ERROR = ""
except ValueError as exc:   # reported by pytest_configure as a usage error
    SELECTED, _ENGINE_ERROR = engines.DEFAULT_ENGINES, str(exc)

#: The fixtures that tie a test to one engine (beside the ``db_url``/``backend_db`` parameter).
ENGINE_FIXTURES = {
    "postgres": {"pg_url", "pg_db_url", "private_pg", "pgbouncer_url", "pgbouncer_db"},
    "mysql": {"mysql_url", "mysql_db_url"},
    "sqlite": {"sqlite_url"},
}
#: Parametrised fixtures whose parameter is the engine name.
ENGINE_PARAMETERS = ("db_url", "backend_db")
#: Module-scoped fixtures: a module's tests on one engine share them, so they go to one xdist worker.
MODULE_SCOPED = ("backend_db",)
#: Modules of long tests (tens of seconds each: fault soaks, whole demos, many CLI processes), started
#: first so that the xdist workers finish together instead of one of them running these at the end.
LONG_FIRST = ("processes/test_soak_and_faults.py", "test_demo.py", "ops/test_remote_control.py",
              "ops/test_sqlq_cli.py", "checkpoint/test_examples.py", "backend/test_workers.py",
              "processes/test_worker_lifecycle.py", "checkpoint/test_workers.py")

ENGINE_PARAMS = engines.engine_params()


def _no_engine(engine: str, reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{engine} is required under CI but {UNAVAILABLE}: {reason}", pytrace=False)
    pytest.skip(f"{engine} {UNAVAILABLE} (set {engines.URL_ENV[engine]} or install its server): {reason}")


def _session_server(engine: str) -> str:
    try:
        return engines.session_server_url(engine)
    except engines.ConfiguredServerBroken as exc:   # an explicit setting that does not work is always an error
        pytest.fail(str(exc), pytrace=False)
    except ServerUnavailable as exc:
        _no_engine(engine, str(exc))


@pytest.fixture(scope="session")
def pg_url() -> str:
    """URL of the run's PostgreSQL server: $SQLQ_TEST_PG_URL or a private initdb server."""
    return _session_server("postgres")


@pytest.fixture(scope="session")
def mysql_url() -> str:
    """URL of the run's MariaDB server: $SQLQ_TEST_MYSQL_URL or a private mariadbd."""
    return _session_server("mysql")


@pytest.fixture
def pg_db_url(pg_url):
    """A fresh PostgreSQL database for this test only (CREATE DATABASE, then DROP ... WITH (FORCE))."""
    with engines.fresh_database("postgres", pg_url) as url:
        yield url


@pytest.fixture
def mysql_db_url(mysql_url):
    """A fresh MariaDB database for this test only (its leftover connections are killed before the DROP)."""
    with engines.fresh_database("mysql", mysql_url) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/jobs.sqlite3"


DB_FIXTURE = {"sqlite": "sqlite_url", "postgres": "pg_db_url", "mysql": "mysql_db_url"}


@pytest.fixture(params=ENGINE_PARAMS)
def db_url(request) -> str:
    """Each test using it runs once per selected engine, each time on a database of its own."""
    return request.getfixturevalue(DB_FIXTURE[request.param])


@pytest.fixture
def private_pg(request):
    """A dedicated, started PrivatePostgres (``.url()``, ``.stop(mode)``, ``.start()``, ``.restart()``).

    Indirect parametrisation passes settings for its postgresql.conf (e.g. ``{"synchronous_commit": "on"}``).
    """
    server = None
    try:
        server = PrivatePostgres(settings=getattr(request, "param", None))
        server.start()
    except (ServerUnavailable, OSError) as exc:
        if server is not None:
            server.destroy()
        _no_engine("postgres", str(exc))
    yield server
    server.destroy()


@pytest.fixture(scope="session")
def pgbouncer_url(pg_url) -> str:
    """URL of the run's PgBouncer (pool_mode=transaction) in front of ``pg_url``'s server, database "postgres"."""
    try:
        return pgbouncer.session_bouncer_url(pg_url)
    except engines.ConfiguredServerBroken as exc:
        pytest.fail(str(exc), pytrace=False)
    except ServerUnavailable as exc:
        _no_engine("postgres", f"no PgBouncer: {exc}")


class BouncedDatabase(NamedTuple):
    direct: str    # the database on PostgreSQL itself (for the test's own reads)
    through: str   # the same database through PgBouncer, with ?sqlq_pool_mode=transaction


@pytest.fixture
def pgbouncer_db(pg_db_url, pgbouncer_url) -> BouncedDatabase:
    """A fresh PostgreSQL database, and its URL through the run's PgBouncer."""
    return BouncedDatabase(pg_db_url, pgbouncer.bouncer_url_for(pg_db_url, pgbouncer_url))


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


# --- hooks ---------------------------------------------------------------------------------------

def _is_controller(config) -> bool:
    return not hasattr(config, "workerinput")   # pytest-xdist workers have it


def pytest_configure(config):
    if _ENGINE_ERROR:
        raise pytest.UsageError(_ENGINE_ERROR)
    # Python's default SIGTERM action skips all cleanup; as KeyboardInterrupt, teardown still runs
    # (workers are killed, private servers stopped) when e.g. `timeout` ends the run.
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)
    if _is_controller(config) and engines.SHARED_DIR_ENV not in os.environ:
        # Where xdist workers meet to share one private server per engine (tests/support/engines.py).
        config._sqlq_shared = Path(tempfile.mkdtemp(prefix="sqlq-run-"))
        os.environ[engines.SHARED_DIR_ENV] = str(config._sqlq_shared)
        os.environ[engines.ROOT_PID_ENV] = str(os.getpid())


def pytest_unconfigure(config):
    shared = getattr(config, "_sqlq_shared", None)
    if shared is not None:
        engines.stop_shared_servers(shared)
        shutil.rmtree(shared, ignore_errors=True)
        os.environ.pop(engines.SHARED_DIR_ENV, None)
        os.environ.pop(engines.ROOT_PID_ENV, None)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _engine_of(item) -> str | None:
    callspec = getattr(item, "callspec", None)
    if callspec is not None:
        for name in ENGINE_PARAMETERS:
            if name in callspec.params:
                return callspec.params[name]
    fixtures = set(getattr(item, "fixturenames", ()))
    for engine in ("postgres", "mysql", "sqlite"):   # a server fixture decides over a side SQLite file
        if ENGINE_FIXTURES[engine] & fixtures:
            return engine
    return None


@pytest.hookimpl(tryfirst=True)   # before xdist's loadgroup renames grouped tests
def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        engine = _engine_of(item)
        if engine is None:
            keep.append(item)
            continue
        if engine not in SELECTED:   # a test tied to an engine that this run does not cover
            drop.append(item)
            continue
        item.add_marker(getattr(pytest.mark, engine))
        tag_engine(item, engine)
        callspec = getattr(item, "callspec", None)
        if callspec is not None and any(name in callspec.params for name in MODULE_SCOPED):
            item.add_marker(pytest.mark.xdist_group(f"{item.module.__name__}-{engine}"))
        keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = sorted(keep, key=_long_first)   # stable: a module's tests stay together and in order


def _long_first(item) -> int:
    path = item.nodeid.split("::", 1)[0].removeprefix("tests/")
    return LONG_FIRST.index(path) if path in LONG_FIRST else len(LONG_FIRST)


def pytest_report_header(config):
    lines = [f"engines: {', '.join(SELECTED)} (SQLQ_TEST_ENGINES; all: {', '.join(engines.ENGINES)})"]
    for engine, var in engines.URL_ENV.items():
        if engine in SELECTED:
            source = var if os.environ.get(var) else "a private server, started on first use"
            lines.append(f"{engine}: {source}")
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    write_engine_summary(terminalreporter, SELECTED, engines.ENGINES)
