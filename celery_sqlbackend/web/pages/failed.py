"""Failed jobs: grouped by error class and task; retry or discard one, a selection, or all a filter matches."""
from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Route

from ... import admin
from ..areas import Area
from ..context import dashboard_of
from ..security import checked_form
from .common import int_param, redirect, text_param

AREA = Area("failed", "Failed", "/failed")
FILTERS = ("queue", "task_name", "error_class")
ACTIONS = {"retry": (admin.retry_failed, admin.retry_failed_all),
           "discard": (admin.discard_failed, admin.discard_failed_all)}


def failed_page(request: Request):
    dash = dashboard_of(request)
    s = dash.settings
    filters = {k: text_param(request, k) for k in FILTERS}
    rows = dash.reads.failed_page(int_param(request, "before"), s.page_size + 1, **filters)
    more = len(rows) > s.page_size
    rows = rows[:s.page_size]
    return dash.render(request, "failed.html", title="Failed jobs", rows=rows, filters=filters,
                       next_before=rows[-1].job_id if more else None,
                       count=dash.reads.failed_count(s.count_cap, s.group_sample, **filters),
                       summary=dash.reads.failed_summary(s.group_sample),
                       done=text_param(request, "done"))


def _ids(form) -> list[int]:
    try:
        return [int(v) for v in form.getlist("job_id")]
    except ValueError:
        raise HTTPException(400, "job_id must be whole numbers") from None


async def failed_action(request: Request):
    """``job_id`` fields: those jobs, now.  ``scope=all``: every job the filters match, as a background run."""
    form = await checked_form(request)
    action = request.path_params["action"]
    if action not in ACTIONS:
        raise HTTPException(404, f"no action {action!r}")
    dash = dashboard_of(request)
    one_by_one, all_matching = ACTIONS[action]
    if form.get("scope") == "all":
        filters = {k: str(form[k]).strip() for k in FILTERS if str(form.get(k) or "").strip()}
        total = await run_in_threadpool(admin.count_failed, dash.store, filters)
        run = dash.bulk.start(action, filters, total, lambda progress: all_matching(
            dash.store, filters, batch_size=500, on_progress=progress))
        return redirect(request, f"/failed/runs/{run.id}")
    ids = _ids(form)
    if not ids:
        raise HTTPException(400, "select at least one job (or use the action for everything the filter matches)")
    n = await run_in_threadpool(one_by_one, dash.store, ids)
    return redirect(request, f"/failed?done={action}+{n}")


def run_page(request: Request):
    dash = dashboard_of(request)
    run = dash.bulk.get(request.path_params["run_id"])
    if run is None:
        raise HTTPException(404, "no such run (runs are kept in memory until the dashboard restarts)")
    return dash.render(request, "bulk_run.html", title=f"{run.action.capitalize()} failed jobs", run=run,
                       refresh=None if run.finished else 1)


routes = [
    Route("/failed", failed_page, name="failed"),
    Route("/failed/runs/{run_id:int}", run_page, name="bulk_run"),
    Route("/failed/{action}", failed_action, methods=["POST"]),
]
