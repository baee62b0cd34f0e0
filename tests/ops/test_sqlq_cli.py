"""Every ``celery sqlq`` subcommand, run through the real ``celery`` CLI on a populated store."""
from __future__ import annotations

import json

import pytest

from celery_sqlbackend import admin

from tests.harness import rows, wait_until

from .populate import populate


@pytest.fixture
def populated(db_url, make_app):
    """A store in a mixed state. On PostgreSQL the tables come from ``celery sqlq migrate``
    (no create_tables), which is how an operator sets one up."""
    pg = db_url.startswith("postgresql")
    cli = make_app(db_url, transport_options={"create_tables": not pg})
    if pg:
        out = cli.run("sqlq", "status", check=False)
        assert out.returncode != 0 and "sqlq migrate" in out.stderr, out.stderr
        head = admin.head_revision()     # (test_migrations pins its value)
        assert f"migrated empty database -> {head}" in cli.run("sqlq", "migrate").stdout
        assert cli.json("sqlq", "migrate") == {"from": head, "to": head, "prefix": "sqlq_"}
    return cli, populate(db_url, create_tables=not pg)


def test_status(populated):
    cli, p = populated
    out = cli.run("sqlq", "status").stdout
    for text in ("alpha", "beta", "claimq", "failq", "ops-test@host", "prefork×2", str(p.claimed[0])):
        assert text in out, out

    st = cli.json("sqlq", "status")
    queues = {q["name"]: q for q in st["queues"]}
    assert {k: queues["alpha"][k] for k in ("ready", "scheduled", "claimed", "failed", "paused")} == \
        {"ready": 3, "scheduled": 1, "claimed": 0, "failed": 0, "paused": False}
    assert queues["alpha"]["latency"] >= 0 and queues["alpha"]["oldest_ready_at"].endswith("Z")
    assert queues["claimq"]["claimed"] == 1 and queues["failq"]["failed"] == 3
    (proc,) = st["processes"]
    assert (proc["name"], proc["pid"], proc["pool"], proc["claimed"]) == ("ops-test@host", 4242, "prefork", 1)
    assert proc["held"][0]["job_id"] == p.claimed[0] and proc["held"][0]["task_name"] == "testapp.add"
    assert proc["dead"] is False and proc["heartbeat_age"] < 300


def test_status_lists_iterative_jobs(populated, db_url):
    """checkpoint's progress rows, written by its real store, in ``celery sqlq status`` and its JSON."""
    from checkpoint.cursor import Progress
    from checkpoint.store import SQLCursorStore
    cli, _ = populated
    store = SQLCursorStore(db_url)
    try:
        store.put("ck-running", Progress(cursor=299, iterations=300, total=1200), task_name="app.backfill")
        store.put("ck-done", Progress(cursor=9, iterations=10, total=10), state="done", task_name="[red]x[/red]")
    finally:
        store.dispose()
    out = cli.run("sqlq", "status").stdout
    assert "Iterative jobs" in out and "app.backfill" in out and "300 / 1200" in out and "25.0%" in out, out
    assert "[red]x[/red]" in out, "stored names are printed literally"
    jobs = {j["task_id"]: j for j in cli.json("sqlq", "status")["iterative_jobs"]}
    assert {k: jobs["ck-running"][k] for k in ("task_name", "state", "iterations", "total", "fraction")} == \
        {"task_name": "app.backfill", "state": "running", "iterations": 300, "total": 1200, "fraction": 0.25}
    assert jobs["ck-done"]["state"] == "done" and jobs["ck-done"]["fraction"] == 1.0
    assert jobs["ck-running"]["updated_at"].endswith("Z")
    assert len(cli.json("sqlq", "status", "--iterative", "1")["iterative_jobs"]) == 1


def test_failed_list_show_retry_discard(populated, db_url):
    cli, p = populated
    (a1, _, _), (a2, _, _), (b1, _, _) = p.failed
    out = cli.run("sqlq", "failed", "list").stdout
    assert "Failed jobs (3 of 3)" in out and "RejectedError" in out and "testapp.boom" in out, out

    listed = cli.json("sqlq", "failed", "list", "--error-class", "ProcessPrunedError")
    assert listed["total"] == 2 and [j["job_id"] for j in listed["jobs"]] == [a1, a2]
    assert cli.json("sqlq", "failed", "list", "--task", "testapp.boom")["total"] == 1
    assert cli.json("sqlq", "failed", "list", "--queue", "nope")["total"] == 0
    assert cli.json("sqlq", "failed", "list", "--older-than", "1h")["total"] == 0
    assert cli.json("sqlq", "failed", "list", "--limit", "1")["jobs"][0]["job_id"] == a1

    shown = cli.run("sqlq", "failed", "show", str(b1)).stdout
    assert "RejectedError" in shown and "(2, 2)" in shown and "failed" in shown, shown
    job = cli.json("sqlq", "failed", "show", str(b1))
    assert job["state"] == "failed" and job["error_class"] == "RejectedError"
    assert job["body"][0] == [2, 2] and job["headers"]["task"] == "testapp.boom"
    assert cli.run("sqlq", "failed", "show", "999999", check=False).returncode != 0

    # Bulk needs --all; ids and --all together are refused.
    assert cli.run("sqlq", "failed", "retry", check=False).returncode == 2
    assert cli.run("sqlq", "failed", "retry", str(a1), "--all", check=False).returncode == 2

    assert "1 failed job(s) retried" in cli.run("sqlq", "failed", "retry", str(a1)).stdout
    assert cli.json("sqlq", "failed", "retry", "--all", "--error-class", "ProcessPrunedError",
                    "--batch-size", "1") == {"retried": 1}
    ready = {r[0] for r in rows(db_url, "SELECT job_id FROM sqlq_ready_executions WHERE queue_name = 'failq'")}
    assert ready == {a1, a2}   # same jobs (same task ids), back to ready

    assert cli.json("sqlq", "failed", "discard", "--all") == {"discarded": 1}
    assert rows(db_url, "SELECT count(*) FROM sqlq_jobs WHERE id = :i", {"i": b1}) == [(0,)]
    assert "0 failed job(s) discarded" in cli.run("sqlq", "failed", "discard", str(b1)).stdout


def test_queue_pause_resume_clear(populated, db_url):
    cli, p = populated
    assert cli.run("sqlq", "queue", "pause", "alpha").stdout.strip() == "queue alpha paused"
    assert cli.json("sqlq", "queue", "pause", "beta") == {"queue": "beta", "paused": True}
    paused = {q["name"] for q in cli.json("sqlq", "status")["queues"] if q["paused"]}
    assert paused == {"alpha", "beta"}
    assert "paused" in cli.run("sqlq", "status").stdout
    assert cli.json("sqlq", "queue", "resume", "beta") == {"queue": "beta", "paused": False}
    assert "queue alpha resumed" in cli.run("sqlq", "queue", "resume", "alpha").stdout
    assert rows(db_url, "SELECT count(*) FROM sqlq_pauses") == [(0,)]

    # clear: waiting jobs (ready and scheduled) go; the claimed one stays to finish.
    assert cli.json("sqlq", "queue", "clear", "alpha") == {"queue": "alpha", "deleted": 4}
    assert "1 waiting job(s) deleted from beta" in cli.run("sqlq", "queue", "clear", "beta", "-f").stdout
    assert cli.json("sqlq", "queue", "clear", "claimq") == {"queue": "claimq", "deleted": 0}
    assert rows(db_url, "SELECT count(*) FROM sqlq_claimed_executions") == [(1,)]


def test_prune_and_clear_finished(populated, db_url):
    cli, p = populated
    report = cli.json("sqlq", "prune")
    assert report["processes"] == []   # the process is alive (fresh heartbeat)
    # Make it silent for longer than alive_threshold: prune takes its claim back.
    rows(db_url, "UPDATE sqlq_processes SET last_heartbeat_at = '2000-01-01 00:00:00'")
    assert cli.json("sqlq", "status")["processes"][0]["dead"] is True
    out = cli.run("sqlq", "prune").stdout
    assert "pruned 1 dead process(es): ops-test@host" in out and "released 1 job(s)" in out, out
    assert rows(db_url, "SELECT job_id FROM sqlq_ready_executions WHERE queue_name = 'claimq'") == [(p.claimed[0],)]

    assert cli.json("sqlq", "clear-finished", "--older-than", "3h") == {"deleted": 0}
    assert cli.run("sqlq", "clear-finished", "--older-than", "bogus", check=False).returncode == 2
    out = cli.run("sqlq", "clear-finished", "--older-than", "1h", "--batch-size", "3").stdout
    assert "4 finished job(s) deleted" in out, out
    assert rows(db_url, "SELECT count(*) FROM sqlq_jobs WHERE finished_at IS NOT NULL") == [(0,)]


def test_check(populated):
    cli, p = populated
    out = cli.run("sqlq", "check").stdout
    assert "database" in out and "migrations" in out and "FAIL" not in out, out
    result = cli.json("sqlq", "check")
    assert result["ok"] is True
    checks = {c["name"]: c for c in result["checks"]}
    assert checks["database"]["ok"] and checks["alive_threshold"]["ok"] and checks["migrations"]["ok"]


def test_check_fails_on_a_database_that_is_down(make_app, tmp_path):
    cli = make_app("postgresql+psycopg://nobody@127.0.0.1:1/none")
    out = cli.run("sqlq", "check", "--json", check=False)
    assert out.returncode == 1, out.stderr
    checks = {c["name"]: c for c in json.loads(out.stdout)["checks"]}
    assert checks["database"]["ok"] is False and "not reachable" in checks["database"]["detail"]


def test_pause_is_honoured_by_a_running_worker_and_resume_wakes_it(db_url, make_app, spawn_worker, tmp_path):
    # PostgreSQL workers sleep until a NOTIFY: with a 60 s poll, only resume's own
    # announcement can start the held job within the wait below. Elsewhere the poll does it.
    notify = db_url.startswith("postgresql")
    interval = 60.0 if notify else 0.5
    cli = make_app(db_url, transport_options={"polling_interval": interval})
    spawn_worker(tmp_path, hostname="pz@%h", pool="threads", concurrency=1, queues="held,free")
    held, free = tmp_path / "held-ran", tmp_path / "free-ran"
    cli.run("sqlq", "queue", "pause", "held")
    cli.run("call", "testapp.touch", "--queue", "held", "--args", json.dumps([str(held)]))
    # A job enqueued after the held one, in a queue the same worker consumes:
    # once it has run, the worker has polled both queues since the pause.
    cli.run("call", "testapp.touch", "--queue", "free", "--args", json.dumps([str(free)]))
    wait_until(free.exists, 20, message="the job of the unpaused queue")
    assert not held.exists()
    assert rows(db_url, "SELECT count(*) FROM sqlq_ready_executions WHERE queue_name = 'held'") == [(1,)]

    cli.run("sqlq", "queue", "resume", "held")
    wait_until(held.exists, 20, interval=0.02, message="the held job after resume (woken by resume's NOTIFY "
                                                         "on PostgreSQL, by the poll elsewhere)")
