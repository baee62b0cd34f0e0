"""Fixtures for the result backend tests.

``backend_db`` is one fresh database per test module (workers are slow to
start, so a module shares one), on SQLite and on PostgreSQL.  The server is
the shared ``pg_url`` fixture of ``tests/conftest.py`` (``$SQLQ_TEST_PG_URL``
or a private initdb server).
"""
from __future__ import annotations

import uuid

import pytest
from sqlalchemy.engine import make_url

def _pg_server(request) -> str:
    # The shared fixture: $SQLQ_TEST_PG_URL or a private server; it fails
    # (never skips) under CI when PostgreSQL cannot be had.
    return request.getfixturevalue("pg_url")


def _fresh_pg_database(server: str) -> tuple[str, callable]:
    import psycopg
    base = make_url(server)
    name = f"be_{uuid.uuid4().hex[:12]}"
    admin_dsn = base.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop():
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return base.set(database=name).render_as_string(hide_password=False), drop


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend_db(request, tmp_path_factory):
    """(kind, SQLAlchemy URL) of a fresh database for this module."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("be") / "store.sqlite3"
        yield "sqlite", f"sqlite:///{path}"
        return
    url, drop = _fresh_pg_database(_pg_server(request))
    yield "postgres", url
    drop()   # WITH (FORCE): pooled and LISTEN connections of this process included
