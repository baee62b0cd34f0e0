"""The Alembic migrations: run in code, with the configurable prefix, matching store/schema.py."""
from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from celery_sqlbackend import admin
from celery_sqlbackend.options import Options
from celery_sqlbackend.store import Store
from celery_sqlbackend.store.schema import tables


def _drift(store: Store) -> list:
    with store.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True,
                                                     "version_table": f"{store.t.prefix}alembic_version"})
        return compare_metadata(ctx, tables(store.t.prefix).metadata)


def test_migrate_creates_the_schema_of_schema_py(db_url):
    """Fails when schema.py changes without a migration: add a revision (never edit 0001)."""
    assert admin.migrate(db_url, prefix="mg_") == admin.head_revision() == "0007"
    store = Store(db_url, Options(table_prefix="mg_", create_tables=False))
    names = set(inspect(store.engine).get_table_names())
    assert {t.name for t in tables("mg_").metadata.sorted_tables} | {"mg_alembic_version"} == names
    assert _drift(store) == []
    assert admin.current_revision(store) == "0007"
    assert admin.migrate(db_url, prefix="mg_") == "0007"          # idempotent
    checks = {c.name: c for c in admin.check(store)}
    assert checks["migrations"].ok and "at head" in checks["migrations"].detail
    # The store works on migrated tables.
    store.queues.pause(queue="q", now=__import__("celery_sqlbackend.store", fromlist=["utcnow"]).utcnow())
    assert admin.paused(store) == ["q"]


def test_migrate_adopts_tables_created_without_migrations(sqlite_url):
    store = Store(sqlite_url, Options())
    store.create_all()
    assert admin.current_revision(store) is None
    checks = {c.name: c for c in admin.check(store)}
    assert checks["migrations"].level == "warning" and "sqlq migrate" in checks["migrations"].detail
    assert admin.migrate(sqlite_url) == "0007"
    assert admin.current_revision(store) == "0007" and _drift(store) == []


def test_check_reports_a_database_without_tables(sqlite_url):
    store = Store(sqlite_url, Options(create_tables=False))
    checks = {c.name: c for c in admin.check(store)}
    assert checks["database"].ok
    assert not checks["migrations"].ok and "sqlq migrate" in checks["migrations"].detail


def test_offline_sql_uses_the_prefix():
    sql = admin.migration_sql("postgresql+psycopg://u@localhost/db", prefix="zz_")
    assert "CREATE TABLE zz_jobs" in sql and "CREATE TABLE zz_alembic_version" in sql
    assert "sqlq_" not in sql
