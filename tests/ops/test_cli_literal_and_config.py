"""``celery sqlq`` prints stored data literally, and refuses bad input with a clear error (issue #13,
items 10 and 12), through the real ``celery`` command line.

Hostile strings (rich markup, a link, ESC bytes, a bidi override) are stored as a publisher or a
worker would store them; every command that prints stored data must show them as written, with
control characters escaped, and never crash.
"""
from __future__ import annotations

import json

import pytest

from tests.harness import rows

QUEUE = "[/oops]"
TASK = "[link=https://evil.example]click me[/link]"
ARGS = "see [/tmp] dir \x1b[2J\x1b]8;;https://evil.example\x07"
ERROR = "Boom: [bold]not bold[/bold] \x1b[31mred\u202eevil\nsecond line [/]"
PROCESS = "w[/red]\x1b[5m@host"


def _hostile(db_url: str, cli) -> int:
    """A job published to QUEUE under TASK with ARGS, failed with ERROR, and a process named PROCESS."""
    code = (f"from testapp import app\n"
            f"app.send_task({TASK!r}, args=[{ARGS!r}], queue={QUEUE!r}, argsrepr={ARGS!r})\n")
    import subprocess
    import sys
    subprocess.run([sys.executable, "-c", code], cwd=cli.directory, env=cli.env, check=True, timeout=60)
    [(job_id,)] = rows(db_url, "select id from sqlq_jobs")
    rows(db_url, "delete from sqlq_ready_executions")
    rows(db_url, "insert into sqlq_failed_executions (job_id, queue_name, error_class, error, failed_at) "
                 "values (:j, :q, 'Boom', :e, CURRENT_TIMESTAMP)", {"j": job_id, "q": QUEUE, "e": ERROR})
    rows(db_url, "insert into sqlq_processes (kind, name, hostname, pid, pool, queues, started_at, "
                 "last_heartbeat_at) values ('worker', :n, :n, 1, 'solo', '[]', CURRENT_TIMESTAMP, "
                 "CURRENT_TIMESTAMP)", {"n": PROCESS})
    return job_id


def test_every_command_prints_stored_data_literally(db_url, make_app):
    cli = make_app(db_url)
    job_id = _hostile(db_url, cli)
    outputs = {
        "status": cli.run("sqlq", "status").stdout,
        "failed list": cli.run("sqlq", "failed", "list").stdout,
        "failed show": cli.run("sqlq", "failed", "show", str(job_id)).stdout,
    }
    for name, out in outputs.items():
        assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out, (name, out)
    assert QUEUE in outputs["status"] and "w[/red]\\x1b[5m@host" in outputs["status"], outputs["status"]
    assert TASK in outputs["failed list"] and QUEUE in outputs["failed list"], outputs["failed list"]
    show = outputs["failed show"]
    for expected in (TASK, QUEUE, "see [/tmp] dir \\x1b[2J\\x1b]8;;https://evil.example\\x07",
                     "Boom: [bold]not bold[/bold] \\x1b[31mred\\u202eevil", "second line [/]"):
        assert expected in show, (expected, show)
    # Pruning the hostile process prints its name, escaped.
    rows(db_url, "update sqlq_processes set last_heartbeat_at = :t", {"t": "2000-01-01 00:00:00"})
    pruned = cli.run("sqlq", "prune").stdout
    assert "\x1b" not in pruned and "w[/red]\\x1b[5m@host" in pruned, pruned


@pytest.mark.parametrize("args, complaint", [
    (("clear-finished", "--older-than", "1d", "--batch-size", "-1"), "-1 is not in the range 1<=x<=100000"),
    (("clear-finished", "--older-than", "99999999999w"), "longer than the 100 years"),
    (("failed", "list", "--limit", "-5"), "-5 is not in the range"),
    (("failed", "show", "99999999999999999999999"), "is not in the range 1<="),
    (("failed", "retry", "--", "-3"), "-3 is not in the range 1<="),
    (("failed", "discard", "0"), "0 is not in the range 1<="),
    (("failed", "retry", "--all", "--batch-size", "0"), "0 is not in the range 1<="),
    (("status", "--held", "-1"), "-1 is not in the range 0<="),
])
def test_numbers_out_of_range_are_usage_errors_not_tracebacks(db_url, make_app, args, complaint):
    cli = make_app(db_url)
    out = cli.run("sqlq", *args, check=False)
    assert out.returncode == 2 and complaint in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_bad_options_stop_the_worker_and_show_in_check(db_url, make_app, spawn_worker, tmp_path):
    cli = make_app(db_url, transport_options={"keep_finished": -1}, sqlq_heartbeat_intreval=5,
                   sqlq_polling_interval="nan")
    report = cli.json("sqlq", "check", check=False)
    details = " ".join(c["detail"] for c in report["checks"])
    assert not report["ok"] and "sqlq_heartbeat_intreval (did you mean sqlq_heartbeat_interval?)" in details
    worker = spawn_worker(tmp_path, wait=False)
    from tests.harness import wait_until
    wait_until(lambda: not worker.alive(), 60, message="the worker refused to start")
    log = worker.log_text()
    assert worker.returncode != 0 and "did you mean sqlq_heartbeat_interval?" in log, log[-3000:]
    cli = make_app(db_url, transport_options={"keep_finished": -1})
    assert "keep_finished must be >= 0" in json.dumps(cli.json("sqlq", "check", check=False))
    cli = make_app(db_url, transport_options={"polling_interval": "nan"})
    assert "polling_interval must be a finite number" in json.dumps(cli.json("sqlq", "check", check=False))


@pytest.mark.parametrize("broker, says", [
    ("sqlq+", "write 'sqlq+' followed by an SQLAlchemy URL"),
    ("sqlq:/jobs.db", "(for this file: 'sqlq+sqlite:///jobs.db')"),
    ("sqlq+postgresql+pg8000://user@127.0.0.1/db", "pip install 'celery-sqlbackend[postgres]'"),
    ("sqlq+sqlite:////no/such/dir/jobs.db", "its directory '/no/such/dir' does not exist"),
])
def test_a_broken_broker_url_stops_the_worker_at_start_and_shows_in_check(tmp_path, broker, says):
    from tests.harness import CeleryWorker, wait_until, write_app
    from tests.ops.conftest import Cli
    write_app(tmp_path, broker)
    report = Cli(tmp_path).json("sqlq", "check", check=False)
    assert not report["ok"] and says in json.dumps(report["checks"]), report
    with CeleryWorker(tmp_path) as worker:
        wait_until(lambda: not worker.alive(), 30, message="the worker stopped at start")
        log = worker.log_text()
    assert worker.returncode != 0 and says in log and "amqp://" not in log, log[-3000:]


def test_an_sqlite_directory_it_cannot_write_is_an_error_not_a_reconnect_loop(tmp_path):
    from tests.harness import CeleryWorker, wait_until, write_app
    write_app(tmp_path, "sqlq+sqlite:////proc/jobs.sqlite3")   # /proc: no file can be created there, even by root
    with CeleryWorker(tmp_path) as worker:
        wait_until(lambda: not worker.alive(), 30, message="the worker stopped at start")
        log = worker.log_text()
    assert "SQLite cannot open or create '/proc/jobs.sqlite3'" in log, log[-3000:]
    assert log.count("unable to open database file") <= 2, log[-3000:]
    from tests.ops.conftest import Cli
    report = Cli(tmp_path).json("sqlq", "check", check=False)
    assert not report["ok"] and "SQLite cannot open or create" in json.dumps(report), report
