"""Passwords never reach a message or a log line (issue #13, item 11).

Real ``celery worker`` processes and a real producer on URLs whose passwords hold the characters that
break naive masking (``/``, ``@``, ``#``), malformed (a configuration error) and well formed but
unreachable (the banner and the reconnect lines); every line they print is searched for the password.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.harness import REPO, CeleryWorker, wait_until, write_app

SECRET = "Pa55w0rdX"

MALFORMED = [
    f"postgresql+psycopg://user:{SECRET}/x@127.0.0.1:notaport/db",     # bad port
    f"postgresql+psycopg://user:{SECRET}@x@127.0.0.1:notaport/db",      # '@' in the password
    f"nosuchdialect://user:{SECRET}#1@127.0.0.1/db",                    # unknown dialect
    f"user:{SECRET}@127.0.0.1/db",                                      # no scheme at all
]


def _producer(tmp_path) -> subprocess.CompletedProcess:
    code = "from testapp import app\napp.send_task('t.any')\n"
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env={"PYTHONPATH": f"{tmp_path}:{REPO}", "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("url", MALFORMED)
def test_a_malformed_url_is_reported_without_its_password(tmp_path, url):
    write_app(tmp_path, f"sqlq+{url}", result_backend=f"sqlq+{url}")
    worker = CeleryWorker(tmp_path)
    try:
        wait_until(lambda: not worker.alive(), 60, message="the worker gave up on a malformed URL")
        log = worker.log_text()
    finally:
        worker.close()
    out = _producer(tmp_path)
    assert worker.returncode != 0 and out.returncode != 0
    assert "ConfigurationError" in log and "***" in log, log[-3000:]
    produced = out.stdout + out.stderr
    if "://" in url:
        assert "ConfigurationError" in produced and "***" in produced, produced[-3000:]
    # Without a scheme Celery cannot tell the backend is ours: its own lookup fails first, naming only
    # the text before the first ':' (and never the password).
    for text in (log, produced):
        assert SECRET not in text, text[-3000:]


def test_an_unreachable_database_is_logged_without_its_password(tmp_path):
    url = f"postgresql+psycopg://user:{SECRET}/x@127.0.0.1:1/db"
    write_app(tmp_path, f"sqlq+{url}", result_backend=f"sqlq+{url}",
              extra_conf={"broker_connection_retry_on_startup": True})
    with CeleryWorker(tmp_path) as worker:
        worker.wait_log(r"Cannot connect to sqlq\+postgresql\+psycopg://user:\*\*\*@127\.0\.0\.1:1/db", 60)
        worker.wait_log(r"Cannot connect to .*\n(.*\n)*.*Cannot connect to", 60)    # retried, still masked
        log = worker.log_text()
    assert "transport:   sqlq+postgresql+psycopg://user:***@127.0.0.1:1/db" in log
    assert SECRET not in log, log[-3000:]
