"""Shared plumbing of the ``celery sqlq`` commands (cli.py and its sibling cli_*.py modules).

The app and store of the invocation, error handling, JSON and table output, and the
parameter types (ages, job ids, batch sizes).  It imports no cli module, so they can all import it.
"""
from __future__ import annotations

import json
import re
from datetime import timedelta
from typing import Any, Callable

import click

from . import admin
from .durations import human
from .errors import SQLQError
from .urls import mask

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class Age(click.ParamType):
    """An age: ``90`` or ``90s``, ``15m``, ``2h``, ``7d``, ``1w``."""
    name = "age"

    def convert(self, value, param, ctx):
        if isinstance(value, timedelta):
            return value
        m = _AGE.match(str(value))
        if not m:
            self.fail(f"{value!r} is not an age; write e.g. 90s, 15m, 2h, 7d", param, ctx)
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
        if seconds > MAX_AGE.total_seconds():
            self.fail(f"{value!r} is longer than the {MAX_AGE.days // 365} years an age may be", param, ctx)
        return timedelta(seconds=seconds)


AGE = Age()
#: The longest age accepted (older cutoffs would fall before year 1).
MAX_AGE = timedelta(days=365 * 100)
#: A job id, as the BIGINT id columns hold it.
JOB_ID = click.IntRange(1, 2**63 - 1)
#: Rows per transaction of a bulk command.
BATCH_SIZE = click.IntRange(1, 100_000)


# --------------------------------------------------------------------------- plumbing

def _app(ctx):
    obj = ctx.find_root().obj
    app = getattr(obj, "app", None)
    if app is None:
        from celery import current_app
        app = current_app
    return app


def _store(ctx):
    try:
        return admin.store_for_app(_app(ctx))
    except SQLQError as exc:
        raise click.UsageError(f"{mask(exc)} (`celery -A yourapp sqlq check` lists every problem)") from None
    except ValueError as exc:
        raise click.UsageError(f"{mask(exc)}. Run it as `celery -A yourapp sqlq …` with a broker_url "
                               "starting with sqlq+.") from None


def _console():
    from rich.console import Console
    return Console()


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(admin.to_dict(data), indent=2, sort_keys=True, default=str))


def _run(fn: Callable[[], Any]) -> Any:
    """Run a store operation, turning expected failures into one readable line."""
    from sqlalchemy.exc import SQLAlchemyError
    try:
        return fn()
    except SQLQError as exc:
        raise click.ClickException(mask(exc)) from None
    except SQLAlchemyError as exc:
        first = mask(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise click.ClickException(f"database error: {first}") from None


def _fmt_age(seconds: float | None) -> str:
    return human(seconds, compact=True)


def _ts(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


def _with_progress(total: int | None, label: str, work: Callable[[Callable[[int], None] | None], int],
                   json_out: bool) -> int:
    """Run ``work(on_progress)`` with a rich progress bar when stderr is a terminal."""
    from rich.console import Console
    console = Console(stderr=True)
    if json_out or not console.is_terminal:
        return work(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        task = progress.add_task(label, total=total)
        return work(lambda n: progress.advance(task, n))


json_option = click.option("--json", "json_out", is_flag=True, help="Print one JSON document (for scripts).")
