"""Small helpers the page modules share: URLs below the mount point, form and query parsing."""
from __future__ import annotations

from datetime import datetime, timezone

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse


def base(request: Request) -> str:
    """Where the dashboard is mounted ("" when it is the whole site)."""
    return request.scope.get("root_path", "")


def redirect(request: Request, path: str) -> RedirectResponse:
    """After an action: back to a page (303, so that a reload does not repeat the POST)."""
    return RedirectResponse(base(request) + path, status_code=303)


def text_param(request: Request, name: str, max_len: int = 500) -> str | None:
    value = request.query_params.get(name, "").strip()
    if len(value) > max_len:
        raise HTTPException(400, f"{name} is longer than {max_len} characters")
    return value or None


def int_param(request: Request, name: str) -> int | None:
    value = request.query_params.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise HTTPException(400, f"{name} must be a whole number, got {value[:40]!r}") from None


def time_param(request: Request, name: str) -> datetime | None:
    """A time filter: ISO 8601 (``2026-01-31T12:00``, ``2026-01-31``); with a zone it is converted to UTC."""
    value = request.query_params.get(name, "").strip()
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise HTTPException(400, f"{name} must be a time like 2026-01-31T12:00 (UTC), got {value[:40]!r}") from None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(timezone.utc).replace(tzinfo=None)
    return parsed


def refresh_param(request: Request) -> int | None:
    """``?refresh=N``: reload the page every N seconds (1-300), for watching a queue or a job move."""
    n = int_param(request, "refresh")
    return max(1, min(300, n)) if n else None
