"""Fixtures for the result backend tests.

``backend_db`` is one fresh database per test module, on SQLite and on
PostgreSQL (``SQLQ_TEST_PG_URL``: an SQLAlchemy URL of a server where we may
create databases, e.g. ``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``;
the PostgreSQL half is skipped when it is not set).
"""
from __future__ import annotations

import os
import uuid

import pytest
from sqlalchemy.engine import make_url

PG_URL = os.environ.get("SQLQ_TEST_PG_URL")


def _fresh_pg_database() -> tuple[str, callable]:
    import psycopg
    base = make_url(PG_URL)
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
    if not PG_URL:
        pytest.skip("SQLQ_TEST_PG_URL is not set")
    url, drop = _fresh_pg_database()
    yield "postgres", url
    from celery_sqlbackend.store.engine import dispose_all
    dispose_all()
    drop()
