"""Jobs: listed by state and queue, filtered by task name, argument text and time; one job's page.

A filter with no index behind it (task name, argument text, time range) is
searched a window of job ids at a time, newest first, until the page is full
or the time budget is spent; the page then says which ids it searched and
offers to continue below them, rather than scanning a million rows at once.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Route

from ... import admin
from ...store.dashboard import STATES, JobFilter, JobPage
from ..areas import Area
from ..context import Dashboard, dashboard_of
from .common import int_param, refresh_param, text_param, time_param

AREA = Area("jobs", "Jobs", "/jobs")


def search(dash: Dashboard, flt: JobFilter, before: int | None) -> JobPage:
    """One page of jobs matching ``flt`` below id ``before`` (see the module doc for the windows)."""
    s = dash.settings
    reads = dash.reads
    if not flt.scans:
        rows = reads.jobs_in_window(flt, before, None, s.page_size + 1)
        page = JobPage(rows[:s.page_size], rows[s.page_size - 1].id if len(rows) > s.page_size else None)
    else:
        low_id, high_id = reads.job_id_bounds()
        if low_id is None:
            return JobPage([], None)
        upper = min(before, high_id + 1) if before is not None else high_id + 1
        rows, lower, window = [], upper, s.search_window
        deadline = time.monotonic() + s.search_budget
        while lower > low_id and len(rows) <= s.page_size:
            lower = max(low_id, lower - window)
            began = time.monotonic()
            rows += reads.jobs_in_window(flt, (rows[-1].id if rows else upper), lower, s.page_size + 1 - len(rows))
            if time.monotonic() > deadline:
                break
            if time.monotonic() - began < s.search_budget / 4:
                window = min(window * 2, 1_000_000)
        full = len(rows) > s.page_size
        rows = rows[:s.page_size]
        if full:
            page = JobPage(rows, rows[-1].id, lower, upper)
        else:
            page = JobPage(rows, lower if lower > low_id else None, lower, upper, stopped_early=lower > low_id)
    if flt.state is None and page.rows:
        states = reads.states_of([r.id for r in page.rows])
        page.rows = [replace(r, state=states.get(r.id, "?")) for r in page.rows]
    return page


def jobs_page(request: Request):
    dash = dashboard_of(request)
    state = text_param(request, "state")
    if state is not None and state not in STATES:
        raise HTTPException(400, f"state must be one of {', '.join(STATES)}, got {state[:40]!r}")
    flt = JobFilter(state=state, queue=text_param(request, "queue"), task=text_param(request, "task"),
                    text=text_param(request, "text"), created_from=time_param(request, "from"),
                    created_to=time_param(request, "to"))
    page = search(dash, flt, int_param(request, "before"))
    params = {k: request.query_params.get(k) for k in ("state", "queue", "task", "text", "from", "to")}
    return dash.render(request, "jobs.html", title="Jobs", page=page, flt=flt, params=params, states=STATES,
                       counts=dash.reads.state_counts(dash.settings.count_cap),
                       estimate=dash.reads.table_estimate(), cap=dash.settings.count_cap, refresh=refresh_param(request))


def _result(dash: Dashboard, task_id: str | None) -> dict[str, Any] | None:
    """The stored result, decoded only when it is JSON (never unpickled: the page must not run stored code)."""
    if not task_id:
        return None
    row = dash.reads.job_result(task_id)
    if row is None:
        return None
    payload = row.pop("payload")
    if row["content_type"] == "application/json":
        try:
            text = payload.decode(row["content_encoding"] or "utf-8") if isinstance(payload, bytes) else payload
            meta = json.loads(text)
            row["value"] = json.dumps(meta.get("result"), indent=2, default=str)
            row["traceback"] = meta.get("traceback")
        except (ValueError, TypeError, LookupError, AttributeError):
            row["value"] = "(undecodable)"
    else:
        row["value"] = f"({row['content_type']}: not decoded here)"
    return row


def job_page(request: Request):
    dash = dashboard_of(request)
    job_id = request.path_params["job_id"]
    job = admin.show_job(dash.store, job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id} (finished jobs are deleted after keep_finished)")
    headers = job.get("headers") or {}
    return dash.render(request, "job.html", title=f"Job {job_id}", job=job, headers=headers,
                       headers_json=json.dumps(headers, indent=2, sort_keys=True, default=str),
                       body_json=json.dumps(job.get("body"), indent=2, default=str),
                       holder=dash.reads.job_holder(job_id), result=_result(dash, job.get("task_id")),
                       refresh=refresh_param(request))


routes = [
    Route("/jobs", jobs_page, name="jobs"),
    Route("/jobs/{job_id:int}", job_page, name="job"),
]
