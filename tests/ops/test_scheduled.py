"""``celery sqlq scheduled`` (and the section of ``status``): the ETA/countdown jobs waiting in the
database, which ``celery inspect scheduled`` cannot list because no worker holds them yet."""
from __future__ import annotations

import json
import re
import socket

from tests.harness import wait_until


def test_scheduled_lists_eta_jobs_that_inspect_scheduled_does_not(db_url, make_app, spawn_worker, tmp_path):
    cli = make_app(db_url)
    spawn_worker(tmp_path, hostname="eta@%h", pool="solo")
    later = cli.run("call", "testapp.add", "--args", "[1, 2]", "--countdown", "3600").stdout.strip()
    sooner = cli.run("call", "testapp.add", "--args", "[3, 4]", "--countdown", "600").stdout.strip()
    other = cli.run("call", "testapp.add", "--args", "[5, 6]", "--countdown", "1800",
                    "--queue", "other").stdout.strip()

    # The read-only commands at once: `celery inspect scheduled` waits out its whole --timeout meanwhile.
    commands = {"json": ("sqlq", "scheduled", "--json"), "other": ("sqlq", "scheduled", "--queue", "other", "--json"),
                "limited": ("sqlq", "scheduled", "--limit", "1", "--json"), "text": ("sqlq", "scheduled"),
                "status": ("sqlq", "status", "--json"), "status_text": ("sqlq", "status"),
                "bad": ("sqlq", "scheduled", "--limit", "-1"),
                "inspect": ("inspect", "scheduled", "--json", "--timeout", "5")}
    out = dict(zip(commands, cli.run_together(*commands.values(), check=False)))
    for name in set(commands) - {"bad", "inspect"}:
        assert out[name].returncode == 0, (name, out[name].stdout, out[name].stderr)

    listed = json.loads(out["json"].stdout)
    assert listed["total"] == 3
    assert [j["task_id"] for j in listed["jobs"]] == [sooner, other, later]       # soonest first
    first = listed["jobs"][0]
    assert first["task_name"] == "testapp.add" and first["queue"] == "celery"
    assert 0 < first["due_in"] <= 600 and first["due_at"].endswith("Z")
    assert [j["task_id"] for j in json.loads(out["other"].stdout)["jobs"]] == [other]
    limited = json.loads(out["limited"].stdout)
    assert limited["total"] == 3 and [j["task_id"] for j in limited["jobs"]] == [sooner]

    text = out["text"].stdout
    assert text.count("testapp.add") == 3 and re.search(r"in \d+\.\dm", text), text
    status = json.loads(out["status"].stdout)
    assert status["scheduled"]["total"] == 3 and status["scheduled"]["jobs"][0]["task_id"] == sooner
    assert "Scheduled" in out["status_text"].stdout
    bad = out["bad"]
    assert bad.returncode == 2 and "Traceback" not in bad.stderr

    # What `celery inspect scheduled` shows: the ETA tasks a worker holds in memory. None here.
    # (A client that got no reply in time, on a slow machine, asks again.)
    replies = json.loads(out["inspect"].stdout or "{}") if out["inspect"].returncode == 0 else {}
    if not replies:
        replies = wait_until(lambda: json.loads(cli.run("inspect", "scheduled", "--json", "--timeout", "5",
                                                        check=False).stdout or "{}"), 30, 0.5, "an inspect reply")
    assert replies == {f"eta@{socket.gethostname()}": []}
