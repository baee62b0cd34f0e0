"""The login form, used only when the dashboard has a token (``SQLQ_WEB_TOKEN``)."""
from __future__ import annotations

from starlette.requests import Request
from starlette.routing import Route

from ..context import dashboard_of
from ..security import SESSION_AGE, SESSION_COOKIE, checked_form, session_cookie, token_matches
from .common import base, redirect


async def login_page(request: Request):
    dash = dashboard_of(request)
    if request.method == "GET":
        return dash.render(request, "login.html", title="Log in", failed=False)
    form = await checked_form(request, action=False)
    if not dash.settings.token:
        return redirect(request, "/queues")
    if not token_matches(str(form.get("token", "")), dash.settings.token):
        return dash.render(request, "login.html", title="Log in", failed=True, status_code=403)
    response = redirect(request, "/queues")
    response.set_cookie(SESSION_COOKIE, session_cookie(dash.settings.secret), max_age=SESSION_AGE, httponly=True,
                        samesite="strict", path=base(request) or "/")
    return response


async def logout_action(request: Request):
    await checked_form(request, action=False)
    response = redirect(request, "/login")
    response.delete_cookie(SESSION_COOKIE, path=base(request) or "/")
    return response


routes = [
    Route("/login", login_page, methods=["GET", "POST"], name="login"),
    Route("/logout", logout_action, methods=["POST"], name="logout"),
]
