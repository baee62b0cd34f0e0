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

import sys

import click
from rich.text import Text

from . import admin, config_check
from .cli_support import (AGE, BATCH_SIZE, _app, _console, _emit_json, _fmt_age, _run, _store, _ts,
                          _with_progress, json_option)
from .limits.status import limits_status
from .terminal import literal, plain
from .urls import database_url


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
    blocked = _run(lambda: limits_status(store))
    if json_out:
        _emit_json(dict(admin.to_dict(st), iterative_jobs=jobs, recurring=admin.to_dict(recurring_tasks or []),
                        blocked=admin.to_dict(blocked)))
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
    if blocked.total:
        console.print(_blocked_table(blocked))
    if jobs:
        _print_iterative(console, jobs)
    if recurring_tasks:
        from .cli_recurring import print_table
        print_table(recurring_tasks)


def _blocked_table(blocked):
    """Jobs waiting on a limit (``limits``), per key: the most blocked keys first."""
    from rich.table import Table
    bt = Table(title=f"Blocked on limits ({blocked.total} jobs; most blocked keys first)", title_justify="left")
    for col in ("limit", "key", "queue", "blocked", "state"):
        bt.add_column(col, justify="right" if col == "blocked" else "left", overflow="fold")
    for k in blocked.keys:
        if k.kind == "rate":
            state = f"{k.limit}/{k.period:g}s" if k.limit else "-"
            if k.next_open is not None:
                state += f", opens in {_fmt_age((k.next_open - admin.utcnow()).total_seconds())}"
        else:
            state = f"{k.held}/{k.limit if k.limit is not None else '?'} slots held"
        bt.add_row(k.kind, literal(k.key), literal(k.queue), str(k.blocked), state)
    return bt


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
from .cli_failed import failed as _failed  # noqa: E402
sqlq.add_command(_failed)
