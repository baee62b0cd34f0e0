"""Processes: every registered worker with its host, pid, pool, heartbeat age and what it holds."""
from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.routing import Route

from ... import admin
from ..areas import Area
from ..context import dashboard_of
from ..security import checked_form
from .common import redirect, refresh_param, text_param

AREA = Area("processes", "Processes", "/processes")


def processes_page(request: Request):
    dash = dashboard_of(request)
    return dash.render(request, "processes.html", title="Processes",
                       processes=admin.processes(dash.store, held_limit=10),
                       alive_threshold=dash.store.options.alive_threshold, done=text_param(request, "done"),
                       refresh=refresh_param(request))


async def prune_action(request: Request):
    """Prune now rather than at the next heartbeat: dead processes (older heartbeat than alive_threshold) only."""
    await checked_form(request)
    report = await run_in_threadpool(admin.prune, dashboard_of(request).store)
    return redirect(request, f"/processes?done=pruned+{len(report.processes)}+process(es),+released+"
                             f"{len(report.released)},+failed+{len(report.failed)}")


routes = [
    Route("/processes", processes_page, name="processes"),
    Route("/processes/prune", prune_action, methods=["POST"]),
]
