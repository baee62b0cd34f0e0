"""TEMPORARY: the old statement names, re-exported for ``Store.q`` until every caller uses the gateways.

Deleted once transport, eventloop, lifecycle, processes and pruner are migrated
(issue #12).  New code calls ``store.<gateway>.<statement>`` instead.
"""
from __future__ import annotations

from sqlalchemy import Connection

from .bindings import bind as bind_queue, of_exchange as exchange_bindings, touch as touch_bindings  # noqa: F401
from .bindings import expire as expire_bindings, transient_queues, unbind_queue  # noqa: F401
from .claims import (Claimed, acks_and_claim, claim, fail, finish, finish_many, mark_acked,  # noqa: F401
                     mark_acked_many, one_statement, record_acks, release)
from .claims import held_since as claims_of  # noqa: F401
from .executions import dispatch_due, has_ready, ready_count  # noqa: F401
from .failed import count_failed, discard_failed, list_failed as failed_jobs, retry_failed  # noqa: F401
from .jobs import clear_finished as _clear_finished, count_finished, detail as job_detail, enqueue  # noqa: F401
from .processes import (Orphan, dead as dead_processes, delete_process, heartbeat, listing as process_list,  # noqa: F401
                        recover, register as register_process, take_claims)
from .queues import drop_waiting, pause, paused as paused_queues, purge, resume, stats as queue_stats, trim_backlog  # noqa: F401
from .schema import Tables
from .sql import delete_batch  # noqa: F401
from .dialects import Dialect


def clear_finished(conn: Connection, t: Tables, d: Dialect, *, before, limit: int) -> int:
    return _clear_finished(conn, t, before=before, limit=limit)


def update_process(conn: Connection, t: Tables, *, process_id: int, **values) -> None:
    conn.execute(t.processes.update().where(t.processes.c.id == process_id).values(**values))
