"""Iterative jobs: every running or interrupted ``IterativeTask`` with its cursor, items done, rate and ETA.

The numbers come from checkpoint's durable checkpoint row, so they move as
often as the task saves it (``checkpoint_every`` / ``checkpoint_interval``).
"""
from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Route

from ..areas import Area
from ..context import Dashboard, dashboard_of
from .common import refresh_param, text_param

STATES = ("running", "interrupted", "done", "failed", "revoked")
ACTIVE = ("running", "interrupted")


def _available(dash: Dashboard) -> bool:
    return dash.reads.has_checkpoints()


AREA = Area("iterative", "Iterative jobs", "/iterative", available=_available)


def iterative_page(request: Request):
    dash = dashboard_of(request)
    if not dash.available(AREA.key, _available):
        raise HTTPException(404, "no iterative jobs here: checkpoint's table does not exist in this database")
    state = text_param(request, "state")
    if state not in (None, "all", *STATES):
        raise HTTPException(400, f"state must be one of all, {', '.join(STATES)}")
    states = None if state == "all" else ([state] if state else list(ACTIVE))
    rows = dash.reads.iterative_jobs(states, dash.settings.page_size * 4)
    return dash.render(request, "iterative.html", title="Iterative jobs", rows=rows, state=state or "active",
                       states=STATES, refresh=refresh_param(request) or 5)


routes = [Route("/iterative", iterative_page, name="iterative")]
