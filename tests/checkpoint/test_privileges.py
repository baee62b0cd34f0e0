"""The checkpoint table comes from migrations: a role with only SELECT/INSERT/UPDATE/DELETE runs iterative jobs."""
from __future__ import annotations

import uuid

import pytest
from celery import Celery
from sqlalchemy.engine import make_url

import celery_sqlbackend  # noqa: F401
from celery_sqlbackend import admin
from celery_sqlbackend.options import Options
from celery_sqlbackend.store import Store
from checkpoint.progress import list_progress
from tests.harness import rows


@pytest.fixture
def dml_role(pg_db_url):
    """A login role with DML rights only on the migrated tables; its URL."""
    admin.migrate(pg_db_url)
    role = f"ck_dml_{uuid.uuid4().hex[:10]}"
    rows(pg_db_url, f'CREATE ROLE "{role}" LOGIN')
    rows(pg_db_url, f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{role}"')
    rows(pg_db_url, f'GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO "{role}"')
    yield make_url(pg_db_url).set(username=role, password=None).render_as_string(hide_password=False)
    rows(pg_db_url, f'DROP OWNED BY "{role}"')
    rows(pg_db_url, f'DROP ROLE IF EXISTS "{role}"')


def test_a_dml_only_role_runs_iterative_jobs(dml_role, pg_db_url, workers):
    with pytest.raises(Exception, match="permission denied"):
        rows(dml_role, "CREATE TABLE ck_probe (x int)")  # the role really cannot create tables
    broker = f"sqlq+{dml_role}"
    app = Celery("ck-dml", broker=broker, backend=broker)
    try:
        result = app.send_task("ck.count_to", args=(300,))
        workers.start(env={"CK_BROKER": broker, "CK_BACKEND": broker})
        assert result.get(timeout=60) == {"iterations": 300, "times_interrupted": 0}
    finally:
        app.close()
    [progress] = list_progress(pg_db_url, task_ids=[result.id])
    assert (progress.state, progress.iterations, progress.total, progress.fraction) == ("done", 300, 300, 1.0)
    assert progress.task_name == "ck.count_to" and progress.started_at <= progress.finished_at


def test_check_reports_a_database_without_the_checkpoint_table(db_url):
    store = Store(db_url, Options(create_tables=False))
    admin.migrate(db_url, revision="0001")
    checks = {c.name: c for c in admin.check(store)}
    assert not checks["migrations"].ok and "sqlq migrate" in checks["migrations"].detail
    admin.migrate(db_url)
    checks = {c.name: c for c in admin.check(store)}
    assert checks["migrations"].ok
