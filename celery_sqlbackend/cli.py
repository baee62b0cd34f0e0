"""``celery sqlq …``: operating the SQL broker from Celery's own command line.

Installed through Celery's ``celery.commands`` entry point, so it is there
wherever ``celery`` is, and reads the app like Celery's own commands::

    celery -A proj sqlq status                   queues (counts, latency, paused) and processes
    celery -A proj sqlq failed list --queue emails --error-class ProcessPrunedError
    celery -A proj sqlq failed show 1234
    celery -A proj sqlq failed retry 1234 1235   # or --all [filters]
    celery -A proj sqlq failed discard --all --older-than 7d
    celery -A proj sqlq queue pause emails       # resume / clear
    celery -A proj sqlq scheduled                # ETA/countdown jobs waiting in the database
    celery -A proj sqlq prune                    # --process NAME forces one out
    celery -A proj sqlq clear-finished --older-than 1d
    celery -A proj sqlq migrate                  # --sql prints the DDL instead
    celery -A proj sqlq check
    celery -A proj sqlq recurring list           # add / pause / resume / remove / run-now (cli_recurring)

Every command takes ``--json`` (one JSON document on stdout, for scripts).
Tables are drawn with rich; bulk operations show a progress bar on a terminal.
"""
from __future__ import annotations

import json
import re
import sys
from datetime import timedelta
from typing import Any, Callable

import click
from rich.text import Text

from . import admin, config_check
from .errors import SQLQError
from .terminal import literal, plain
from .urls import database_url, mask

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
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


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


# --------------------------------------------------------------------------- the group

@click.group(name="sqlq")
@click.pass_context
def sqlq(ctx):
    """Operate the SQL broker: status, failed jobs, queues, pruning, migrations."""
    # Subcommands defined in other modules (the dashboard) find the store here,
    # so that they need not import this module (which imports them).
    ctx.meta[STORE_LOOKUP] = lambda: _store(ctx)


# --------------------------------------------------------------------------- status

@sqlq.command()
@json_option
@click.option("--held", default=5, show_default=True, type=click.IntRange(0, 1000), help="Jobs listed per process.")
@click.option("--iterative", "iterative_limit", default=20, show_default=True, type=click.IntRange(min=1),
              help="Iterative (checkpoint) jobs listed, most recently updated first.")
@click.pass_context
def status(ctx, json_out, held, iterative_limit):
    """Queues (ready, scheduled, claimed, failed, latency, paused), registered processes and iterative jobs."""
    store = _store(ctx)
    st = _run(lambda: admin.status(store, held_limit=held))
    jobs = _run(lambda: _iterative_jobs(_app(ctx), iterative_limit))
    recurring_tasks = _run(lambda: _recurring_tasks(store))
    if json_out:
        _emit_json(dict(admin.to_dict(st), iterative_jobs=jobs, recurring=admin.to_dict(recurring_tasks or [])))
        return
    from rich.table import Table
    console = _console()
    qt = Table(title=literal(f"Queues ({store!r})"), title_justify="left")
    for col, just in (("queue", "left"), ("ready", "right"), ("scheduled", "right"), ("claimed", "right"),
                      ("failed", "right"), ("latency", "right"), ("state", "left")):
        qt.add_column(col, justify=just)
    for q in st.queues:
        qt.add_row(literal(q.name), str(q.ready), str(q.scheduled), str(q.claimed),
                   Text(str(q.failed), style="red") if q.failed else "0",
                   _fmt_age(q.latency) if q.ready else "-",
                   Text("paused", style="yellow") if q.paused else "active")
    if not st.queues:
        qt.add_row("(no jobs)", "", "", "", "", "", "")
    console.print(qt)
    pt = Table(title="Processes", title_justify="left")
    for col in ("id", "name", "host", "pid", "pool", "last heartbeat", "claimed", "holds"):
        pt.add_column(col, justify="right" if col in ("id", "pid", "claimed") else "left",
                      overflow="fold")
    for p in st.processes:
        beat = Text(f"{_fmt_age(p.heartbeat_age)} ago")
        if p.dead:
            beat = Text(f"{beat} (dead)", style="red")
        holds = ", ".join(f"{h.job_id}:{h.task_name or '?'}{'*' if h.started else ''}" for h in p.held)
        if p.claimed > len(p.held):
            holds += f" … (+{p.claimed - len(p.held)})"
        pool = f"{p.pool or '-'}" + (f"×{p.concurrency}" if p.concurrency else "")
        pt.add_row(str(p.id), literal(p.name), literal(p.hostname), str(p.pid), literal(pool), beat,
                   str(p.claimed), literal(holds or "-"))
    if not st.processes:
        pt.add_row("", "(no registered processes)", "", "", "", "", "", "")
    console.print(pt)
    if any(h.started for p in st.processes for h in p.held):
        console.print("[dim]* started (acked) and running[/dim]")
    if st.scheduled is not None and st.scheduled.total:
        console.print(_scheduled_table(st.scheduled, title="Scheduled (ETA/countdown, soonest first)"))
    if jobs:
        _print_iterative(console, jobs)
    if recurring_tasks:
        from .cli_recurring import print_table
        print_table(recurring_tasks)


def _iterative_jobs(app, limit: int) -> list:
    """checkpoint's progress rows (its store: ``checkpoint_store_url`` or the broker's database)."""
    from checkpoint.progress import list_progress
    from checkpoint.store import store_url_for_app, table_prefix_for_app
    url = store_url_for_app(app)
    if not url:
        return []
    return list_progress(url, limit=limit, table_prefix=table_prefix_for_app(app))


def _print_iterative(console, jobs: list) -> None:
    from rich.table import Table
    from rich.text import Text
    it = Table(title="Iterative jobs", title_justify="left")
    for col in ("task", "id", "state", "items done / total", "fraction", "updated"):
        it.add_column(col, justify="right" if col in ("items done / total", "fraction") else "left",
                      overflow="fold")
    now = admin.utcnow()
    for j in jobs:
        done = f"{j.iterations} / {j.total if j.total is not None else '?'}"
        fraction = f"{j.fraction:.1%}" if j.fraction is not None else "-"
        # Stored names and ids are shown literally (Text), never read as rich markup.
        it.add_row(Text(j.task_name or "?"), Text(j.task_id), Text(j.state), done, fraction,
                   f"{_fmt_age((now - j.updated_at).total_seconds())} ago")
    console.print(it)


def _scheduled_table(sched, title: str):
    from rich.markup import escape
    from rich.table import Table
    table = Table(title=title, title_justify="left")
    for col in ("job", "task", "task id", "queue", "priority", "due at (UTC)", "due in"):
        table.add_column(col, justify="right" if col in ("job", "priority") else "left", overflow="fold")
    for job in sched.jobs:
        due_in = f"in {_fmt_age(job.due_in)}" if job.due_in > 0 else f"due {_fmt_age(-job.due_in)} ago"
        table.add_row(str(job.job_id), escape(job.task_name or "?"), escape(job.task_id or "-"), escape(job.queue),
                      str(job.priority), _ts(job.due_at), due_in)
    if sched.total > len(sched.jobs):
        table.caption = f"{len(sched.jobs)} of {sched.total} scheduled job(s)"
    if not sched.jobs:
        table.add_row("", "(no scheduled jobs)", "", "", "", "", "")
    return table


@sqlq.command()
@click.option("--queue", "-Q", help="Only jobs of this queue.")
@click.option("--limit", type=click.IntRange(min=0, max=100_000), default=50, show_default=True,
              help="How many of the soonest jobs to list.")
@json_option
@click.pass_context
def scheduled(ctx, queue, limit, json_out):
    """ETA/countdown jobs waiting in the database for their time, soonest first.

    `celery inspect scheduled` lists none of these: it asks each worker for the
    ETA tasks it holds in memory, and with this broker a job waits in the
    database until it is due; only then does a worker receive it.
    """
    store = _store(ctx)
    sched = _run(lambda: admin.scheduled(store, queue=queue, limit=limit))
    if json_out:
        _emit_json(sched)
        return
    _console().print(_scheduled_table(sched, title=f"Scheduled jobs ({store!r})"))


def _recurring_tasks(store) -> list | None:
    """The recurring tasks, or None where their table does not exist (a database not migrated yet)."""
    from . import recurring
    return recurring.tasks(store) if store.recurring.table_exists() else None


# --------------------------------------------------------------------------- failed

@sqlq.group()
def failed():
    """Failed jobs: list, show, retry, discard.

    A job is failed when its task raised with no retries left (unless
    record_task_failures is off), when the consumer rejected it, when its payload
    could not be decoded, or when its worker died after starting it.  Retry runs
    it again under the same task id.
    """


def _filter_options(fn):
    fn = click.option("--queue", "-Q", help="Only jobs of this queue.")(fn)
    fn = click.option("--task", "task_name", help="Only jobs of this task name.")(fn)
    fn = click.option("--error-class", help="Only jobs failed with this error class.")(fn)
    fn = click.option("--older-than", type=AGE, help="Only jobs failed longer ago than this (e.g. 1h, 7d).")(fn)
    return fn


def _filters(queue, task_name, error_class, older_than) -> dict:
    return {k: v for k, v in dict(queue=queue, task_name=task_name, error_class=error_class,
                                  older_than=older_than).items() if v is not None}


@failed.command(name="list")
@_filter_options
@click.option("--limit", default=50, show_default=True, type=click.IntRange(0, 1_000_000),
              help="At most this many (0: all).")
@json_option
@click.pass_context
def failed_list(ctx, queue, task_name, error_class, older_than, limit, json_out):
    """List failed jobs, oldest first."""
    store = _store(ctx)
    filters = _filters(queue, task_name, error_class, older_than)
    jobs = _run(lambda: admin.list_failed(store, limit=limit or None, **filters))
    total = _run(lambda: admin.count_failed(store, filters))
    if json_out:
        _emit_json({"total": total, "jobs": jobs})
        return
    from rich.table import Table
    t = Table(title=Text(f"Failed jobs ({len(jobs)} of {total})"), title_justify="left")
    for col in ("job", "task", "task id", "queue", "error", "failed at (UTC)"):
        t.add_column(col, justify="right" if col == "job" else "left", overflow="fold")
    for j in jobs:
        first = (j.error or "").strip().splitlines()[0] if j.error else ""
        error = first[:160] if first.startswith(j.error_class) else f"{j.error_class}: {first[:120]}"
        t.add_row(str(j.job_id), literal(j.task_name or "-"), literal(j.task_id or "-"), literal(j.queue),
                  literal(error, style="red"), _ts(j.failed_at))
    _console().print(t)


@failed.command(name="show")
@click.argument("job_id", type=JOB_ID)
@json_option
@click.pass_context
def failed_show(ctx, job_id, json_out):
    """Show one job: state, error, headers and arguments."""
    store = _store(ctx)
    job = _run(lambda: admin.show_job(store, job_id))
    if job is None:
        raise click.ClickException(f"no job {job_id}")
    if json_out:
        _emit_json(job)
        return
    from rich.table import Table
    t = Table(show_header=False, title=f"Job {job_id}", title_justify="left")
    t.add_column("field", style="bold")
    t.add_column("value", overflow="fold")
    headers = job.get("headers") or {}
    for key in ("state", "queue_name", "task_name", "task_id", "priority", "deliveries", "releases"):
        t.add_row(key, literal(job.get(key)))
    for key in ("created_at", "scheduled_at", "expires_at", "finished_at", "failed_at"):
        if job.get(key) is not None:
            t.add_row(key, _ts(job[key]) + " UTC")
    if "argsrepr" in headers or "kwargsrepr" in headers:
        t.add_row("args", literal(headers.get("argsrepr")))
        t.add_row("kwargs", literal(headers.get("kwargsrepr")))
    else:
        t.add_row("body", literal(json.dumps(job.get("body"), default=str)[:2000]))
    if job.get("error_class"):
        t.add_row("error", Text.assemble(literal(job["error_class"], style="red"), "\n",
                                         literal(job.get("error") or "", keep_newlines=True)))
    _console().print(t)


def _bulk_command(ctx, action: str, job_ids, all_, filters, batch_size, json_out):
    store = _store(ctx)
    if job_ids and (all_ or filters):
        raise click.UsageError("give job ids, or --all with filters, not both")
    if not job_ids and not all_:
        raise click.UsageError("give job ids, or --all (with --queue/--task/--error-class/--older-than "
                               "to narrow it)")
    if job_ids:
        fn = admin.retry_failed if action == "retry" else admin.discard_failed
        n = _run(lambda: fn(store, job_ids))
    else:
        total = _run(lambda: admin.count_failed(store, filters))
        fn = admin.retry_failed_all if action == "retry" else admin.discard_failed_all
        verb = "Retrying" if action == "retry" else "Discarding"
        n = _run(lambda: _with_progress(
            total, f"{verb} failed jobs",
            lambda progress: fn(store, filters, batch_size=batch_size, on_progress=progress), json_out))
    if json_out:
        _emit_json({"retried" if action == "retry" else "discarded": n})
    else:
        done = "retried (back to ready)" if action == "retry" else "discarded"
        click.echo(f"{n} failed job(s) {done}")


@failed.command(name="retry")
@click.argument("job_ids", nargs=-1, type=JOB_ID)
@click.option("--all", "all_", is_flag=True, help="Every failed job matching the filters.")
@_filter_options
@click.option("--batch-size", default=500, show_default=True, type=BATCH_SIZE, help="Jobs per transaction with --all.")
@json_option
@click.pass_context
def failed_retry(ctx, job_ids, all_, queue, task_name, error_class, older_than, batch_size, json_out):
    """Put failed jobs back to ready (same job, same task id)."""
    _bulk_command(ctx, "retry", job_ids, all_, _filters(queue, task_name, error_class, older_than),
                  batch_size, json_out)


@failed.command(name="discard")
@click.argument("job_ids", nargs=-1, type=JOB_ID)
@click.option("--all", "all_", is_flag=True, help="Every failed job matching the filters.")
@_filter_options
@click.option("--batch-size", default=500, show_default=True, type=BATCH_SIZE, help="Jobs per transaction with --all.")
@json_option
@click.pass_context
def failed_discard(ctx, job_ids, all_, queue, task_name, error_class, older_than, batch_size, json_out):
    """Delete failed jobs for good."""
    _bulk_command(ctx, "discard", job_ids, all_, _filters(queue, task_name, error_class, older_than),
                  batch_size, json_out)


# --------------------------------------------------------------------------- queues

@sqlq.group()
def queue():
    """Pause, resume or clear a queue."""


@queue.command(name="pause")
@click.argument("name")
@json_option
@click.pass_context
def queue_pause(ctx, name, json_out):
    """Stop every worker claiming from NAME (held in the database, across restarts)."""
    store = _store(ctx)
    _run(lambda: admin.pause(store, name))
    _emit_json({"queue": name, "paused": True}) if json_out else click.echo(f"queue {plain(name)} paused")


@queue.command(name="resume")
@click.argument("name")
@json_option
@click.pass_context
def queue_resume(ctx, name, json_out):
    """Let workers claim from NAME again."""
    store = _store(ctx)
    _run(lambda: admin.resume(store, name))
    _emit_json({"queue": name, "paused": False}) if json_out else click.echo(f"queue {plain(name)} resumed")


@queue.command(name="clear")
@click.argument("name")
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
@json_option
@click.pass_context
def queue_clear(ctx, name, force, json_out):
    """Delete every waiting (ready or scheduled) job of NAME; running jobs finish."""
    store = _store(ctx)
    if not force and not json_out and sys.stdin.isatty():
        click.confirm(f"Delete every waiting job of queue {name}? There is no undo", abort=True)
    n = _run(lambda: admin.clear_queue(store, name))
    _emit_json({"queue": name, "deleted": n}) if json_out else click.echo(f"{n} waiting job(s) deleted from {plain(name)}")


# --------------------------------------------------------------------------- maintenance

@sqlq.command()
@click.option("--process", "process_name", metavar="NAME",
              help="Also force out this registered process (its name, e.g. worker1@host, or its id), "
                   "whatever its heartbeat says.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation (with --process).")
@json_option
@click.pass_context
def prune(ctx, process_name, yes, json_out):
    """Prune dead processes (and expired remote-control/event queues) now.

    A process is dead when its heartbeat is older than alive_threshold, or when it
    was registered from this host and its PID no longer runs it (checked with the
    process start time, so a reused PID is not mistaken for it).  Jobs it had
    started fail with ProcessPrunedError (their results too); the others go back
    to ready.
    """
    store = _store(ctx)
    force: list[int] = []
    if process_name is not None:
        found = _run(lambda: admin.processes_named(store, process_name))
        if not found:
            raise click.ClickException(f"no registered process is named {process_name!r}; "
                                       "`celery sqlq status` lists them")
        for p in found:
            if not yes:
                click.confirm(f"Force out process {p.name} (pid {p.pid} on {p.hostname}, process id {p.id})? "
                              "Jobs it started fail; the others go back to ready", abort=True)
            force.append(p.id)
    app = _app(ctx)
    r = _run(lambda: admin.prune(store, app=app, force=force))
    if json_out:
        _emit_json(r)
        return
    click.echo(f"pruned {len(r.processes)} dead process(es){': ' + plain(', '.join(r.processes)) if r.processes else ''}; "
               f"released {len(r.released)} job(s), failed {len(r.failed)} job(s); "
               f"expired {len(r.expired_queues)} transient queue(s), dropped {r.dropped_messages} message(s)")


@sqlq.command(name="clear-finished")
@click.option("--older-than", type=AGE, required=True, help="Finished longer ago than this (e.g. 1h, 7d).")
@click.option("--batch-size", type=BATCH_SIZE, default=None, help="Rows per transaction (default: clear_batch_size).")
@json_option
@click.pass_context
def clear_finished(ctx, older_than, batch_size, json_out):
    """Delete finished jobs older than --older-than, in batches."""
    store = _store(ctx)
    total = _run(lambda: admin.count_finished(store, older_than))
    n = _run(lambda: _with_progress(
        total, "Clearing finished jobs",
        lambda progress: admin.clear_finished(store, older_than, batch_size=batch_size, on_progress=progress),
        json_out))
    _emit_json({"deleted": n}) if json_out else click.echo(f"{n} finished job(s) deleted")


# --------------------------------------------------------------------------- schema

def _url_and_prefix(ctx, url, prefix):
    if url:
        from .store.schema import DEFAULT_PREFIX
        return url, prefix or DEFAULT_PREFIX
    store = _store(ctx)
    return store.url, prefix or store.t.prefix


@sqlq.command()
@click.option("--url", help="SQLAlchemy (or sqlq+) URL; default: the app's broker.")
@click.option("--prefix", help="Table prefix; default: the app's table_prefix.")
@click.option("--revision", default="head", show_default=True)
@click.option("--sql", "sql_only", is_flag=True, help="Print the DDL instead of running it.")
@json_option
@click.pass_context
def migrate(ctx, url, prefix, revision, sql_only, json_out):
    """Apply the Alembic migrations to the database."""
    url, prefix = _url_and_prefix(ctx, url, prefix)
    if sql_only:
        click.echo(_run(lambda: admin.migration_sql(url, prefix, revision)))
        return
    before = None
    try:
        from .options import Options
        from .store import Store
        before = admin.current_revision(Store(database_url(url), Options(table_prefix=prefix)))
    except Exception:
        pass
    after = _run(lambda: admin.migrate(url, prefix, revision))
    if json_out:
        _emit_json({"from": before, "to": after, "prefix": prefix})
    elif before == after:
        click.echo(f"database already at {after}")
    else:
        click.echo(f"migrated {before or 'empty database'} -> {after} (tables {prefix}*)")


@sqlq.command()
@json_option
@click.pass_context
def check(ctx, json_out):
    """Check the configuration: thresholds, pool sizes, the database, migrations."""
    app = _app(ctx)
    found = config_check.problems(app.conf)
    if found:   # nothing to connect to until these are fixed: report them, as check's rows
        results = [admin.CheckResult("configuration", False, problem) for problem in found]
    else:
        results = admin.check(_store(ctx), app)
    failed_ = [r for r in results if not r.ok and r.level == "error"]
    if json_out:
        _emit_json({"ok": not failed_, "checks": results})
    else:
        from rich.table import Table
        t = Table(title="sqlq check", title_justify="left")
        t.add_column("")
        t.add_column("check")
        t.add_column("detail", overflow="fold")
        for r in results:
            mark = Text("ok", style="green") if r.ok else (Text("FAIL", style="red") if r.level == "error"
                                                           else Text("warn", style="yellow"))
            t.add_row(mark, r.name, literal(r.detail))
        _console().print(t)
    if failed_:
        ctx.exit(1)


from .web.command import STORE_LOOKUP, web as _web  # noqa: E402  (the dashboard: its extra is imported only when it runs)
sqlq.add_command(_web)
from .cli_recurring import recurring as _recurring  # noqa: E402
sqlq.add_command(_recurring)
