"""Queues: counts per state, latency, throughput over the last minutes; pause and resume."""
from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.routing import Route

from ... import admin
from ...store import utcnow
from ..areas import Area
from ..context import dashboard_of
from ..security import checked_form
from .common import redirect, refresh_param

AREA = Area("queues", "Queues", "/queues")


def queues_page(request: Request):
    dash = dashboard_of(request)
    s = dash.settings
    rows = admin.queues(dash.store)
    flow = dash.reads.throughput(utcnow(), s.throughput_minutes, s.throughput_cap)
    peak = max([n for counts in flow.by_queue.values() for n in counts] or [0])
    names = sorted({q.name for q in rows} | set(flow.by_queue))
    has_blocked = any(getattr(q, "blocked", None) is not None for q in rows)
    return dash.render(request, "queues.html", title="Queues", queues=rows, flow=flow, peak=peak,
                       flow_names=names, has_blocked=has_blocked, refresh=refresh_param(request))


async def pause_action(request: Request):
    await checked_form(request)
    await run_in_threadpool(admin.pause, dashboard_of(request).store, request.path_params["name"])
    return redirect(request, "/queues")


async def resume_action(request: Request):
    await checked_form(request)
    await run_in_threadpool(admin.resume, dashboard_of(request).store, request.path_params["name"])
    return redirect(request, "/queues")


routes = [
    Route("/queues", queues_page, name="queues"),
    Route("/queues/{name:path}/pause", pause_action, methods=["POST"]),
    Route("/queues/{name:path}/resume", resume_action, methods=["POST"]),
]
