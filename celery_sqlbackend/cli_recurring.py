"""``celery sqlq recurring …``: list and change recurring tasks while schedulers run.

    celery -A proj sqlq recurring list [--json]
    celery -A proj sqlq recurring add KEY TASK (--every 30s | --cron "0 2 * * *" [--tz Europe/Berlin]
                                              | --solar sunset:52.5:13.4) [--args '[1]'] [--kwargs '{}']
                                              [--queue q] [--priority n] [--expires s] [--missed catch_up:3]
    celery -A proj sqlq recurring pause|resume|remove|run-now KEY

Running schedulers act on a change within one tick (``sqlq_beat_tick``).
"""
from __future__ import annotations

import json
from typing import Any

import click

from . import recurring as api
from . import slots as slotlib
from .errors import SQLQError
from .store import utcnow
from .urls import mask

# (cli.py adds this group to ``celery sqlq``; these few helpers are this module's own so that
# the two modules never import each other.)
json_option = click.option("--json", "json_out", is_flag=True, help="Print one JSON document (for scripts).")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _app(ctx):
    app = getattr(ctx.find_root().obj, "app", None)
    if app is None:
        from celery import current_app
        app = current_app
    return app


def _emit_json(data: Any) -> None:
    from .admin import to_dict
    click.echo(json.dumps(to_dict(data), indent=2, sort_keys=True, default=str))


def _run(fn):
    """Run an API call, turning expected failures into one readable line (passwords masked)."""
    from sqlalchemy.exc import SQLAlchemyError
    try:
        return fn()
    except (SQLQError, ValueError) as exc:
        raise click.ClickException(mask(exc)) from None
    except SQLAlchemyError as exc:
        first = mask(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise click.ClickException(f"database error: {first}") from None


def _console():
    from rich.console import Console
    return Console()


def _ts(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


def _fmt_age(seconds: float) -> str:
    seconds = abs(seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h" if seconds < 172800 else f"{seconds / 86400:.1f}d"


def _seconds(value: str) -> float:
    text = value.strip().lower()
    unit = text[-1] if text and text[-1] in _UNITS and not text[-1].isdigit() else ""
    try:
        number = float(text[:-1] if unit else text)
    except ValueError:
        raise click.UsageError(f"--every {value!r}: write e.g. 30s, 15m, 2h") from None
    return number * _UNITS[unit]


@click.group()
def recurring():
    """Recurring tasks (celery_sqlbackend.beat:DatabaseScheduler): list, add, pause, resume, remove, run now."""


def print_table(tasks: list[api.RecurringTask], title: str = "Recurring tasks") -> None:
    """The table ``list`` and ``status`` print (stored text printed literally, never as markup)."""
    from rich.table import Table
    from rich.text import Text
    now = utcnow()
    t = Table(title=title, title_justify="left")
    for col in ("key", "task", "schedule", "missed", "next run", "last run", "last task id", "state"):
        t.add_column(col, overflow="fold")
    for r in tasks:
        nxt = "-" if r.next_run_at is None else f"{_ts(r.next_run_at)} (in {_fmt_age((r.next_run_at - now).total_seconds())})"
        last = "-" if r.last_run_at is None else f"{_ts(r.last_run_at)} ({_fmt_age((now - r.last_run_at).total_seconds())} ago)"
        t.add_row(Text(r.key), Text(r.task), Text(r.schedule), r.missed, nxt, last, Text(r.last_task_id or "-"),
                  Text("paused", style="yellow") if r.paused else Text("active"))
    if not tasks:
        t.add_row("(none)", "", "", "", "", "", "", "")
    _console().print(t)


@recurring.command(name="list")
@json_option
@click.pass_context
def list_(ctx, json_out):
    """Each task's schedule, next and last run, last task id, and whether it is paused."""
    app = _app(ctx)
    tasks = _run(lambda: api.tasks(app))
    if json_out:
        _emit_json(tasks)
    else:
        print_table(tasks)


def _schedule(every, cron, tz, solar) -> Any:
    given = [x for x in (every, cron, solar) if x is not None]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --every 30s, --cron 'm h dom mon dow' or --solar event:lat:lon")
    try:
        if every is not None:
            return slotlib.Every(_seconds(every))
        if cron is not None:
            return slotlib.parse_cron(cron, tz or "UTC")
        event, lat, lon = solar.split(":")
        return slotlib.Solar(event, float(lat), float(lon))
    except slotlib.ScheduleError as exc:
        raise click.UsageError(str(exc)) from None
    except ValueError:
        raise click.UsageError(f"--solar {solar!r}: write event:latitude:longitude, e.g. sunset:52.5:13.4") from None


def _json_arg(value: str | None, name: str, kind: type) -> Any:
    if value is None:
        return kind()
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise click.UsageError(f"{name} must be JSON ({exc}), e.g. --args '[1, \"a\"]' --kwargs '{{\"n\": 2}}'") from None
    if not isinstance(parsed, kind):
        raise click.UsageError(f"{name} must be a JSON {'list' if kind is list else 'object'}")
    return parsed


@recurring.command()
@click.argument("key")
@click.argument("task")
@click.option("--every", help="An interval: 30s, 15m, 1h (slots aligned to the epoch).")
@click.option("--cron", help="A crontab line's five fields: 'minute hour day-of-month month day-of-week'.")
@click.option("--tz", help="The crontab's time zone (IANA name); default UTC.")
@click.option("--solar", help="event:latitude:longitude, e.g. sunset:52.5:13.4 (needs ephem).")
@click.option("--args", "args_json", help="Positional arguments as a JSON list.")
@click.option("--kwargs", "kwargs_json", help="Keyword arguments as a JSON object.")
@click.option("--queue", help="The queue to send to.")
@click.option("--priority", type=int, help="The jobs' priority.")
@click.option("--expires", type=float, help="Seconds after sending when a job not started is discarded.")
@click.option("--missed", default="latest", show_default=True, help="After downtime: skip, latest or catch_up:N.")
@json_option
@click.pass_context
def add(ctx, key, task, every, cron, tz, solar, args_json, kwargs_json, queue, priority, expires, missed, json_out):
    """Add KEY (or change it) to send TASK on a schedule."""
    schedule = _schedule(every, cron, tz, solar)
    options = {k: v for k, v in (("queue", queue), ("priority", priority), ("expires", expires)) if v is not None}
    args, kwargs = _json_arg(args_json, "--args", list), _json_arg(kwargs_json, "--kwargs", dict)
    app = _app(ctx)
    try:
        outcome = _run(lambda: api.add(app, key, task, schedule, args=args, kwargs=kwargs, options=options,
                                       missed=missed))
    except api.RecurringTaskError as exc:
        raise click.UsageError(str(exc)) from None
    if json_out:
        _emit_json({"key": key, "result": outcome})
    else:
        click.echo(f"{key}: {outcome} ({schedule.describe()})")


def _keyed(name: str, action, done: str):
    @recurring.command(name=name)
    @click.argument("key")
    @json_option
    @click.pass_context
    def command(ctx, key, json_out):
        app = _app(ctx)
        result = _run(lambda: action(app, key))
        if json_out:
            _emit_json({"key": key, "result": result})
        else:
            click.echo(f"{key}: {done(result)}")
    command.__doc__ = action.__doc__
    return command


_keyed("pause", api.pause, lambda changed: "paused" if changed else "was already paused")
_keyed("resume", api.resume, lambda changed: "resumed" if changed else "was not paused")
_keyed("remove", api.remove, lambda _: "removed")
_keyed("run-now", api.run_now, lambda task_id: f"sent (task id {task_id})")
