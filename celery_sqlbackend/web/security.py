"""Who may look, and proof that an action came from our own form.

* **Token** (optional, e.g. from ``SQLQ_WEB_TOKEN``): a browser types it once
  into the login form and gets a signed, HttpOnly, SameSite=Strict session
  cookie; a scraper sends ``Authorization: Bearer <token>``.  Compared in
  constant time.
* **CSRF**: every response carries a random ``sqlq_csrf`` cookie, and every
  form a hidden field holding that value *signed* with the app's secret
  (double submit, signed so that a cookie planted by a sibling subdomain is
  not enough).  :func:`checked_form` refuses a POST whose two do not match.
* **Read-only**: :func:`checked_form` refuses every action, whatever the form.
"""
from __future__ import annotations

import hmac
import secrets

from itsdangerous import BadSignature, TimestampSigner, URLSafeSerializer
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response

CSRF_COOKIE = "sqlq_csrf"
SESSION_COOKIE = "sqlq_session"
SESSION_AGE = 12 * 3600
#: Paths reachable without the token (the login form itself, and the stylesheet it uses).
OPEN_PATHS = ("/login", "/static/")


def _csrf_serializer(secret: str) -> URLSafeSerializer:
    return URLSafeSerializer(secret, salt="sqlq-web-csrf")


def _session_signer(secret: str) -> TimestampSigner:
    return TimestampSigner(secret, salt="sqlq-web-session")


def token_matches(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def session_cookie(secret: str) -> str:
    return _session_signer(secret).sign(b"ok").decode()


def _has_session(request: Request, secret: str) -> bool:
    value = request.cookies.get(SESSION_COOKIE)
    if not value:
        return False
    try:
        return _session_signer(secret).unsign(value, max_age=SESSION_AGE) == b"ok"
    except BadSignature:
        return False


class Guard(BaseHTTPMiddleware):
    """Asks for the token (when one is set) and hands every request its CSRF token."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        from .context import dashboard_of
        settings = dashboard_of(request).settings
        path = request.url.path[len(request.scope.get("root_path", "")):] or "/"
        cookie = request.cookies.get(CSRF_COOKIE)
        fresh = not cookie or len(cookie) < 16
        if fresh:
            cookie = secrets.token_urlsafe(24)
        request.state.csrf_cookie = cookie
        request.state.csrf_token = _csrf_serializer(settings.secret).dumps(cookie)
        if settings.token and not path.startswith(OPEN_PATHS):
            bearer = request.headers.get("authorization", "")
            given = bearer[7:] if bearer.lower().startswith("bearer ") else None
            if not (token_matches(given, settings.token) or _has_session(request, settings.secret)):
                if path == "/metrics" or request.method != "GET":
                    return PlainTextResponse("authentication required: send Authorization: Bearer <token>",
                                             status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return RedirectResponse(f"{request.scope.get('root_path', '')}/login", status_code=303)
        response = await call_next(request)
        if fresh:
            response.set_cookie(CSRF_COOKIE, cookie, httponly=True, samesite="strict",
                                path=(request.scope.get("root_path") or "/"))
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault("Content-Security-Policy",
                                    "default-src 'self'; style-src 'self'; img-src 'self' data:; "
                                    "form-action 'self'; frame-ancestors 'none'")
        return response


async def checked_form(request: Request, action: bool = True) -> FormData:
    """The POSTed form, once its CSRF token matches this browser's cookie (and, for actions, not read-only)."""
    from .context import dashboard_of
    settings = dashboard_of(request).settings
    if action and settings.read_only:
        raise HTTPException(403, "this dashboard is read-only (started with --read-only)")
    form = await request.form()
    try:
        signed_for = _csrf_serializer(settings.secret).loads(str(form.get("csrf", "")))
    except BadSignature:
        signed_for = None
    if not signed_for or not hmac.compare_digest(str(signed_for), request.cookies.get(CSRF_COOKIE, "")):
        raise HTTPException(403, "the form's CSRF token does not match this browser's cookie: "
                                 "reload the page and submit again")
    return form
