"""``celery sqlq failed …``: list, show, retry and discard failed jobs (cli.py adds this group)."""
from __future__ import annotations

import json

import click
from rich.text import Text

from . import admin
from .cli_support import AGE, BATCH_SIZE, JOB_ID, _console, _emit_json, _run, _store, _ts, _with_progress, json_option
from .terminal import literal

@click.group()
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


def _bulk_options(fn):
    """The arguments and options shared by ``failed retry`` and ``failed discard``."""
    for decorate in reversed((
            click.argument("job_ids", nargs=-1, type=JOB_ID),
            click.option("--all", "all_", is_flag=True, help="Every failed job matching the filters."),
            _filter_options,
            click.option("--batch-size", default=500, show_default=True, type=BATCH_SIZE,
                         help="Jobs per transaction with --all."),
            json_option,
            click.pass_context)):
        fn = decorate(fn)
    return fn


@failed.command(name="retry")
@_bulk_options
def failed_retry(ctx, job_ids, all_, queue, task_name, error_class, older_than, batch_size, json_out):
    """Put failed jobs back to ready (same job, same task id)."""
    _bulk_command(ctx, "retry", job_ids, all_, _filters(queue, task_name, error_class, older_than),
                  batch_size, json_out)


@failed.command(name="discard")
@_bulk_options
def failed_discard(ctx, job_ids, all_, queue, task_name, error_class, older_than, batch_size, json_out):
    """Delete failed jobs for good."""
    _bulk_command(ctx, "discard", job_ids, all_, _filters(queue, task_name, error_class, older_than),
                  batch_size, json_out)
