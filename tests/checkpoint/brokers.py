"""The brokers checkpoint's real-worker tests run on: sqlq (on each ``db_url`` engine) and Redis.

checkpoint promises any broker, so the failure tests run on ours and on Redis.
Redis comes from ``$SQLQ_TEST_REDIS_URL`` (``.ci/run`` starts one), else from a
private ``redis-server`` on a free port for the session; without one the Redis
cases are skipped loudly, except under ``$CI``, where they fail.  Each test
uses a queue of its own, so tests sharing one Redis do not see each other's jobs.

Use in a test module::

    from .brokers import broker, redis_url  # noqa: F401  (fixtures)
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Optional

import pytest
from celery import Celery

import celery_sqlbackend  # noqa: F401  (registers the sqlq transport)
from celery_sqlbackend import admin
from tests.harness import free_port, wait_until


def _ping(url: str) -> bool:
    import redis
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        return bool(client.ping())
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_url():
    """A Redis server URL: $SQLQ_TEST_REDIS_URL, or a private redis-server for the session."""
    configured = os.environ.get("SQLQ_TEST_REDIS_URL")
    if configured:
        try:
            _ping(configured)
        except Exception as exc:  # an explicit setting that does not work is always an error
            pytest.fail(f"SQLQ_TEST_REDIS_URL={configured!r} is not reachable: {exc}", pytrace=False)
        yield configured
        return
    binary = shutil.which("redis-server")
    if binary is None:
        reason = "no Redis for the checkpoint broker tests: set SQLQ_TEST_REDIS_URL or install redis-server"
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    directory = tempfile.mkdtemp(prefix="ck-redis-")
    port = free_port()
    proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                             "--dir", directory], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_until(lambda: _ping_quietly(url), 20, 0.05, "private redis-server answering PING")
        yield url
    finally:
        proc.kill()
        proc.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


def _ping_quietly(url: str) -> bool:
    try:
        return _ping(url)
    except Exception:
        return False


@dataclass
class Setup:
    """One broker configuration for ckapp: broker, durable store, result backend, a queue of its own."""

    kind: str                 # "sqlq" or "redis"
    db_url: str               # the SQL database: broker (sqlq), checkpoint store, results
    broker_url: str
    store_url: Optional[str]  # checkpoint_store_url (None: the broker's database)
    backend_url: str
    queue: str = field(default_factory=lambda: f"ck-{uuid.uuid4().hex[:10]}")

    def env(self, **extra: str) -> dict:
        env = {"CK_BROKER": self.broker_url, "CK_BACKEND": self.backend_url, "CK_QUEUE": self.queue}
        if self.store_url:
            env["CK_STORE"] = self.store_url
        env.update(extra)
        return env

    def producer(self) -> Celery:
        app = Celery("ck-producer", broker=self.broker_url, backend=self.backend_url)
        app.conf.update(task_default_queue=self.queue, broker_connection_retry_on_startup=True)
        if self.kind == "sqlq":
            app.conf.broker_transport_options = {"polling_interval": 0.05}
        return app


@pytest.fixture(params=["sqlq", "redis"])
def broker(request, db_url) -> Setup:
    """sqlq on this test's ``db_url`` engine, and Redis with its cursors and results in ``db_url``."""
    if not db_url.startswith("sqlite"):
        admin.migrate(db_url)  # servers get their tables from migrations, never at run time
    if request.param == "sqlq":
        return Setup("sqlq", db_url, f"sqlq+{db_url}", None, f"sqlq+{db_url}")
    return Setup("redis", db_url, request.getfixturevalue("redis_url"), db_url, f"sqlq+{db_url}")
