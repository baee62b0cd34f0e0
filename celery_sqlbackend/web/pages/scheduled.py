"""Scheduled jobs: those with an ETA or countdown, soonest first."""
from __future__ import annotations

from datetime import datetime

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Route

from ..areas import Area
from ..context import dashboard_of
from .common import text_param

AREA = Area("scheduled", "Scheduled", "/scheduled")


def _after(request: Request) -> tuple[datetime, int] | None:
    """The keyset cursor ``<iso time>|<job id>`` of the next page."""
    raw = text_param(request, "after")
    if raw is None:
        return None
    try:
        at, job_id = raw.rsplit("|", 1)
        return datetime.fromisoformat(at), int(job_id)
    except ValueError:
        raise HTTPException(400, "after must be '<time>|<job id>' as the Next link writes it") from None


def scheduled_page(request: Request):
    dash = dashboard_of(request)
    s = dash.settings
    queue = text_param(request, "queue")
    rows = dash.reads.scheduled_page(queue, _after(request), s.page_size + 1)
    more = len(rows) > s.page_size
    rows = rows[:s.page_size]
    after = f"{rows[-1].scheduled_at.isoformat()}|{rows[-1].job_id}" if more else None
    return dash.render(request, "scheduled.html", title="Scheduled jobs", rows=rows, queue=queue, after=after,
                       count=dash.reads.state_counts(s.count_cap)["scheduled"])


routes = [Route("/scheduled", scheduled_page, name="scheduled")]
