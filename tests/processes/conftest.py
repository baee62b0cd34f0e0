"""TEMPORARY fallback fixtures until tests/conftest.py lands (then delete this file)."""
from __future__ import annotations

import os
import uuid

import pytest
from sqlalchemy import create_engine, text

PG_ADMIN = os.environ.get("SQLQ_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:55432/postgres")


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path}/jobs.sqlite3"


@pytest.fixture
def pg_db_url():
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    yield PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request):
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_db_url")
