"""The dashboard: queues, jobs, failed jobs, processes, scheduled and iterative jobs, ``/metrics``.

An ASGI application (Starlette, Jinja2 templates with autoescape, plain HTML
forms) installed with the ``web`` extra::

    pip install 'celery-sqlbackend[web]'
    celery -A proj sqlq web --port 8089          # serves on 127.0.0.1 by default

or mounted in an application that has its own login::

    from celery_sqlbackend.web import create_app
    app.mount("/sqlq", create_app(celery_app, read_only=True))

Why a separate package behind an extra: the broker itself must stay small;
only people who open the dashboard need Starlette, Jinja2 and uvicorn.
"""
from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def create_app(source: Any, **kwargs: Any):
    """The dashboard for ``source`` (a Celery app, a Store, or a database URL); see :mod:`.app`."""
    try:
        from .app import create_app as _create
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ImportError(f"the dashboard needs the web extra: pip install 'celery-sqlbackend[web]' "
                          f"({exc})") from None
    return _create(source, **kwargs)
