"""``celery -A proj sqlq web``: serve the dashboard with uvicorn.

The socket is bound and listening before the address is printed, so that
``--port 0`` prints the port the system chose and a client may connect at
once (tests and scripts read the address from stdout).
"""
from __future__ import annotations

import socket

import click

#: ``ctx.meta`` key under which ``celery sqlq`` puts a function returning the app's store.
STORE_LOOKUP = "celery_sqlbackend.store_lookup"


@click.command(name="web")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (anything but localhost exposes the dashboard to the network).")
@click.option("--port", default=8089, show_default=True, type=int, help="Port (0: any free port).")
@click.option("--read-only", is_flag=True, help="Show everything, allow no action.")
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@click.pass_context
def web(ctx, host: str, port: int, read_only: bool, log_level: str) -> None:
    """Serve the dashboard (queues, jobs, failed jobs, processes, /metrics) over HTTP.

    Set SQLQ_WEB_TOKEN to ask every visitor for that token.
    """
    try:
        import uvicorn

        from .app import TOKEN_ENV, create_app
    except ImportError as exc:
        raise click.ClickException(f"the dashboard needs the web extra: pip install 'celery-sqlbackend[web]' "
                                   f"({exc.name or exc} is missing)") from None
    import os

    app = create_app(ctx.meta[STORE_LOOKUP](), read_only=read_only)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)        # connections wait in the backlog from the moment the address is printed
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    notes = [n for n, on in (("read-only", read_only), (f"token from {TOKEN_ENV}", bool(os.environ.get(TOKEN_ENV))))
             if on]
    click.echo(f"sqlq dashboard on http://{shown}:{bound}/" + (f" ({', '.join(notes)})" if notes else ""),
               nl=True)
    if host not in ("127.0.0.1", "localhost", "::1") and not os.environ.get(TOKEN_ENV):
        click.echo(f"warning: listening on {host} without {TOKEN_ENV}: anyone who can reach it can act "
                   "on your queues", err=True)
    config = uvicorn.Config(app, log_level=log_level, access_log=log_level in ("info", "debug"))
    uvicorn.Server(config).run(sockets=[sock])
