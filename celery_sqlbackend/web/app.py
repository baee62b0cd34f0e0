"""``create_app``: the dashboard as a Starlette application.

Each page module (``pages/*``) contributes its routes and, for the nav, an
:class:`~.areas.Area`.  Handlers are plain functions run in Starlette's thread
pool, because every store call is a blocking SQLAlchemy transaction.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from ..options import Options
from ..store import Store
from ..store.dashboard import DashboardReads
from . import formatting
from .bulk import BulkRuns
from .context import Dashboard, Settings, dashboard_of
from .pages import failed, iterative, jobs, login, metrics, processes, queues, recurring, scheduled
from .security import Guard

HERE = Path(__file__).parent
#: In nav order.  A new feature's page module is added here (see :mod:`.areas`).
PAGE_MODULES = (queues, jobs, failed, scheduled, recurring, processes, iterative, metrics, login)
#: The environment variable holding the optional access token.
TOKEN_ENV = "SQLQ_WEB_TOKEN"


def resolve_store(source: Any, table_prefix: str | None = None) -> Store:
    """A Store from a Celery app (its ``sqlq+`` broker), a Store, or a database URL."""
    if isinstance(source, Store):
        return source
    if isinstance(source, str):
        url = source.removeprefix("sqlq+")
        return Store(url, Options(table_prefix=table_prefix) if table_prefix else Options())
    from ..admin import store_for_app
    return store_for_app(source)


def _templates() -> Jinja2Templates:
    env = Environment(loader=FileSystemLoader(str(HERE / "templates")),
                      autoescape=select_autoescape(default=True, default_for_string=True))
    formatting.install(env)
    return Jinja2Templates(env=env)


def create_app(source: Any, *, read_only: bool = False, token: str | None = None, secret: str | None = None,
               table_prefix: str | None = None, **settings: Any) -> Starlette:
    """The dashboard for ``source`` (a Celery app, a ``Store``, or an ``sqlq+``/SQLAlchemy URL).

    ``token``: asked once per browser (default: ``$SQLQ_WEB_TOKEN``; pass ``token=""`` for none).
    ``read_only``: no actions at all.  ``secret`` signs cookies (default: random per process).
    Further keyword arguments override :class:`~.context.Settings` (caps, page size).
    """
    if token is None:
        token = os.environ.get(TOKEN_ENV) or None
    options = Settings(read_only=read_only, token=token or None, **({"secret": secret} if secret else {}),
                       **settings)
    store = resolve_store(source, table_prefix)
    routes: list = [Route("/", _home, name="home")]
    for module in PAGE_MODULES:
        routes.extend(module.routes)
    routes.append(Mount("/static", app=StaticFiles(directory=str(HERE / "static")), name="static"))
    app = Starlette(routes=routes, middleware=[Middleware(Guard)],
                    exception_handlers={HTTPException: _http_error})
    app.state.dashboard = Dashboard(store=store, settings=options, templates=_templates(),
                                    reads=DashboardReads(store), bulk=BulkRuns(),
                                    areas=[m.AREA for m in PAGE_MODULES if hasattr(m, "AREA")])
    return app


def _home(request: Request):
    return RedirectResponse(f"{request.scope.get('root_path', '')}/queues", status_code=303)


async def _http_error(request: Request, exc: HTTPException):
    if not hasattr(request.state, "csrf_token") or request.url.path.endswith("/metrics"):
        return PlainTextResponse(str(exc.detail), status_code=exc.status_code)
    return dashboard_of(request).render(request, "error.html", status_code=exc.status_code,
                                        title=f"Error {exc.status_code}", message=str(exc.detail))
