"""Only workers are registered processes: remote-control clients leave no row behind (issue #13, item 14).

A health probe (``celery inspect ping``) run by twenty clients at once, and ``celery control`` calls, read their
replies without claims, so they never appear in ``processes`` (``celery sqlq status``) and nothing is
pruned after them.
"""
from __future__ import annotations

import json

from tests.harness import rows


def test_twenty_inspect_pings_and_a_control_call_leave_no_process_rows(db_url, make_app, spawn_worker,
                                                                       tmp_path):
    cli = make_app(db_url)
    spawn_worker(tmp_path, hostname="probed@%h", pool="solo")
    [(worker_row,)] = rows(db_url, "select name from sqlq_processes")
    # Twenty clients at once: each gets its own reply, from the one worker.  Each names the worker
    # (``-d``), so it returns at its reply instead of waiting out its ``--timeout``; the timeout can then
    # be long enough for a loaded machine, where twenty Python processes starting at once on two cores
    # delayed a reply past 3 s.
    pings = cli.run_together(*[("inspect", "ping", "--json", "-d", worker_row, "--timeout", "30")] * 20)
    for client, out in enumerate(pings):
        assert out.returncode == 0, (client, out.stdout, out.stderr)
        assert json.loads(out.stdout) == {worker_row: {"ok": "pong"}}, (client, out.stdout)
    cli.run("control", "enable_events", "-d", worker_row, "--timeout", "30")
    assert rows(db_url, "select kind, name from sqlq_processes") == [("worker", worker_row)]
    assert rows(db_url, "select count(*) from sqlq_claimed_executions") == [(0,)]
