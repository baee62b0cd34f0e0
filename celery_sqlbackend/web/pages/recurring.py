"""Recurring tasks (celery_sqlbackend.beat): schedule, next and last run, pause/resume, run now.

Shown where the recurring tasks table exists.  A change here is a committed
row; every running scheduler acts on it within one tick.
"""
from __future__ import annotations

from functools import lru_cache

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Route

from ... import recurring
from ...store import Store
from ..areas import Area
from ..context import Dashboard, dashboard_of
from ..security import checked_form
from .common import redirect, refresh_param


def _available(dash: Dashboard) -> bool:
    return dash.store.recurring.table_exists()


AREA = Area("recurring", "Recurring", "/recurring", available=_available)


def recurring_page(request: Request):
    dash = dashboard_of(request)
    if not dash.available(AREA.key, _available):
        raise HTTPException(404, "no recurring tasks here: their table does not exist in this database "
                                 "(run `celery sqlq migrate`)")
    rows = recurring.tasks(dash.store)
    return dash.render(request, "recurring.html", title="Recurring tasks", rows=rows,
                       refresh=refresh_param(request))


@lru_cache(maxsize=None)
def _publisher(store: Store):
    """A Celery app publishing to ``store`` (the dashboard may have been given only a store or URL):
    run-now needs no task code, only the broker."""
    from celery import Celery
    app = Celery("sqlq-dashboard", broker=f"sqlq+{store.engine.url.render_as_string(hide_password=False)}",
                 set_as_current=False)
    app.conf.broker_transport_options = {"table_prefix": store.options.table_prefix}
    return app


def _action(kind: str):
    async def action(request: Request):
        await checked_form(request)
        store = dashboard_of(request).store
        key = request.path_params["key"]
        try:
            if kind == "run":
                await run_in_threadpool(recurring.run_now, _publisher(store), key)
            else:
                await run_in_threadpool(getattr(recurring, kind), store, key)
        except recurring.RecurringTaskError as exc:
            raise HTTPException(404, str(exc)) from None
        return redirect(request, "/recurring")
    return action


routes = [
    Route("/recurring", recurring_page, name="recurring"),
    Route("/recurring/{key:path}/pause", _action("pause"), methods=["POST"]),
    Route("/recurring/{key:path}/resume", _action("resume"), methods=["POST"]),
    Route("/recurring/{key:path}/run", _action("run"), methods=["POST"]),
]
