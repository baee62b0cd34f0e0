"""Fixtures for the result backend tests.

``backend_db`` is one fresh database per test module and engine (workers are slow to start, so a
module shares one), parametrised over the selected engines like ``db_url``. The servers are the run's
(``pg_url`` / ``mysql_url`` of tests/conftest.py), which fail (never skip) under CI when unavailable.
A module's tests on one engine run in one pytest-xdist worker (tests/conftest.py groups them).
"""
from __future__ import annotations

import pytest

from tests.support import engines

SERVER_FIXTURE = {"postgres": "pg_url", "mysql": "mysql_url"}


@pytest.fixture(scope="module", params=engines.engine_params())
def backend_db(request, tmp_path_factory):
    """(engine, SQLAlchemy URL) of a fresh database for this module: "sqlite", "postgres" or "mysql"."""
    engine = request.param
    if engine == "sqlite":
        path = tmp_path_factory.mktemp("be") / "store.sqlite3"
        yield engine, f"sqlite:///{path}"
        return
    with engines.fresh_database(engine, request.getfixturevalue(SERVER_FIXTURE[engine]), prefix="be") as url:
        yield engine, url
