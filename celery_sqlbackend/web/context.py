"""What every page handler needs: the store, its reads, the settings, the templates.

One :class:`Dashboard` per application, kept in ``app.state.dashboard``, so
that two dashboards (say, two stores mounted side by side) never share state.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from starlette.requests import Request
from starlette.templating import Jinja2Templates

from ..store import Store
from ..store.dashboard import DashboardReads
from .bulk import BulkRuns


@dataclass(frozen=True)
class Settings:
    #: No action (pause, retry, discard, prune) is offered or accepted.
    read_only: bool = False
    #: When set, every page asks for it once (a login form; ``Authorization: Bearer`` for scrapers).
    token: str | None = None
    #: Signs the CSRF and session cookies; random per process unless given (restarts log everyone out).
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    #: Counts stop here ("10,000+") rather than scanning a large table.
    count_cap: int = 10_000
    #: Failures grouped (and counted) by task over this many of the latest.
    group_sample: int = 5_000
    #: Rows per page.
    page_size: int = 50
    #: A filtered job search walks windows of job ids, starting with this many and doubling while
    #: a window takes less than a quarter of the budget, until the page is full or the budget is spent.
    search_window: int = 5_000
    search_budget: float = 0.1
    #: Minutes of throughput shown on the Queues page, and the most finished rows read for it.
    throughput_minutes: int = 10
    throughput_cap: int = 100_000


@dataclass
class Dashboard:
    store: Store
    settings: Settings
    templates: Jinja2Templates
    reads: DashboardReads
    bulk: BulkRuns
    #: The nav's areas, in order (see :mod:`.areas`).
    areas: list = field(default_factory=list)
    #: Cached availability of optional areas: key -> (checked at, available).
    _available: dict[str, tuple[float, bool]] = field(default_factory=dict)

    def available(self, key: str, check: Callable[["Dashboard"], bool], ttl: float = 30.0) -> bool:
        """Whether an optional area (iterative jobs, recurring tasks, …) exists here; rechecked every ``ttl`` s."""
        now = time.monotonic()
        seen = self._available.get(key)
        if seen is None or now - seen[0] > ttl:
            try:
                ok = bool(check(self))
            except Exception:
                ok = False
            seen = self._available[key] = (now, ok)
        return seen[1]

    def render(self, request: Request, name: str, status_code: int = 200, **context: Any):
        from .areas import nav
        context.setdefault("title", name.removesuffix(".html").capitalize())
        return self.templates.TemplateResponse(
            request, name, {"nav": nav(self), "read_only": self.settings.read_only,
                            "csrf_token": request.state.csrf_token, "authenticated": self.settings.token is not None,
                            **context}, status_code=status_code)


def dashboard_of(request: Request) -> Dashboard:
    return request.app.state.dashboard
