"""The claim loop as one packet of statements (MariaDB): the acks since the last loop, then the next batch.

Why: on MariaDB the loop was nine statements and the commit, ten round trips
whose answers the driver parses in Python: 3.3-4.2 ms a loop, of which the
durable commit is under 1 ms.  MariaDB has no data-modifying CTEs (PostgreSQL's
one statement, ``claim_statements.loop_in_one``), but it runs several statements sent
in one packet (the ``CLIENT_MULTI_STATEMENTS`` flag, set on the store's
connections by ``enable``).  The statements below need nothing from each
other's results, so the whole loop is that packet, its ``START TRANSACTION``
and ``COMMIT`` included: one round trip.  (The claim loop's connection is in
autocommit mode for it: ``Store.run(commits_itself=True)``.  A statement that
fails ends the packet there, and the store closes that connection, which rolls
back the rest.)  Written as SQL text, not Core: SQLAlchemy compiles and runs one
statement per execution; the driver's own cursor sends the packet.

How the claim finds its own rows without a result in between: the claim is an
``INSERT … SELECT … FOR UPDATE SKIP LOCKED`` straight from the ready rows
into ``claimed_executions``, stamped with a ``claimed_at`` no earlier loop of
this process used (``_loop_stamp``).  The statements after it (one
multi-table ``DELETE`` of the ready rows and of the unique keys held "while
waiting", then the read of the jobs: the delivery is counted when it ends,
``deliveries``) find this loop's claims by ``process_id`` and that stamp.

The rules of ``claims`` hold unchanged:

* fenced both ways: the claim inserts only while the process row exists (held
  with a shared lock from the first statement, so a pruner cannot delete it
  before the commit), and every ack names the process that must still hold the
  claim (each claim locked before its job: ``_finish``);
* locks in index order: the process row, the ready rows in the poll index's
  order (which is the claim's ORDER BY: the walk stops after ``limit`` rows;
  their jobs are only read); acks take claims before jobs, as the pruner does;
* a lost lock race (1213, 1205) fails the packet at that statement; the server
  runs nothing after it, the store rolls back and runs the loop again.

One queue per loop: a claim from several queues must pick the best ``limit``
across them (``claims._take_by_queue``), which needs the rows in hand; those
workers keep the statement-by-statement loop.

A loop may also carry a ``Look``: after a claim that took jobs, the round looks
whether the worker's remote-control (broadcast) queues have anything ready, so
that a revoke published before those jobs is delivered before them
(``claim_round``).  On the hub that look was a round trip of its own after
every claim; the packet answers it with one more statement, read after the
claim in the same transaction, and the round skips the look when it says none.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Sequence

from sqlalchemy import Connection, Engine, event
from sqlalchemy.exc import DBAPIError

from .schema import Tables
from .sql import by_process
from .unique_keys import CLAIMED

#: The protocol flag that lets one query packet carry several statements (the
#: same bit in PyMySQL's and mysqlclient's ``constants.CLIENT``).
MULTI_STATEMENTS = 1 << 16

_stamps: dict[int, datetime] = {}
_stamps_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _stamps_lock
    _stamps_lock = threading.Lock()   # (a parent's thread may have held it at the fork)
    _stamps.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def enable(engine: Engine) -> None:
    """Let ``engine``'s connections take several statements per packet (``CLIENT_MULTI_STATEMENTS``).

    Set on the store's own engine only.  Every statement the store sends binds
    its values as parameters, so the flag gives nothing to an injected string;
    the application's engines are left as they are.
    """
    @event.listens_for(engine, "do_connect")   # (must come before a listener that makes the connection)
    def _flag(_dialect, _record, _cargs, cparams):
        cparams["client_flag"] = cparams.get("client_flag", 0) | MULTI_STATEMENTS


@dataclass
class Look:
    """Queues to look at after a claim, in its transaction: ``found`` is the answer, None where no
    packet gave one (another engine, a claim of several queues, no claim sent)."""
    queues: list[str]
    found: bool | None = None


def usable(queues: Sequence[str]) -> bool:
    """The packet claims from one queue (see the module doc)."""
    return len(set(queues)) == 1


def acks_and_claim(conn: Connection, t: Tables, *, marks: Sequence[tuple[int, int]],
                   finishes: Sequence[tuple[int, int]], keep: bool, queue: str, limit: int,
                   process_id: int, now: datetime, look: Look | None = None) -> tuple[list[int], list[tuple]]:
    """``claims.acks_and_claim`` in one packet.  ``marks`` must not name a job of ``finishes``.

    Returns (job ids finished, rows of the claimed jobs: id, queue_name, priority, payload, deliveries),
    and answers ``look`` (module doc).  On a ``conn`` in no transaction (the claim loop's, in autocommit
    mode: ``Store.run(commits_itself=True)``) the packet is its own, from ``START TRANSACTION`` to ``COMMIT``.
    """
    params: dict[str, Any] = {"now": now, "stamp": _loop_stamp(process_id, now), "queue": queue}
    statements = _acks(t, marks, finishes, keep) + _claim(t, int(process_id), int(limit))
    if look is not None and look.queues:
        names = [f"look_{i}" for i in range(len(look.queues))]
        params.update(zip(names, look.queues))
        statements.append((f"SELECT 1 FROM {t.ready.name} WHERE queue_name IN "
                           f"({', '.join(f'%({name})s' for name in names)}) LIMIT 1", "look"))
    if not conn.in_transaction():
        statements = [("START TRANSACTION", None), *statements, ("COMMIT", None)]
    results = _send(conn, statements, params)
    claimed = [tuple(row) for kind, rows in results if kind == "claimed" for row in rows]
    claimed.sort(key=lambda row: (-row[2], row[0]))
    if look is not None and look.queues:
        look.found = any(rows for kind, rows in results if kind == "look")
    return _done(results), claimed


def record_acks(conn: Connection, t: Tables, *, marks: Sequence[tuple[int, int]],
                finishes: Sequence[tuple[int, int]], keep: bool, now: datetime) -> list[int]:
    """``claims.record_acks`` in one packet (acks no claim carries); the job ids finished."""
    statements = _acks(t, marks, finishes, keep)
    return _done(_send(conn, statements, {"now": now})) if statements else []


def _acks(t: Tables, marks: Sequence[tuple[int, int]], finishes: Sequence[tuple[int, int]],
          keep: bool) -> list[tuple[str, str | None]]:
    statements: list[tuple[str, str | None]] = []
    for ack_pid, job_ids in by_process(finishes).items():
        statements += _finish(t, ack_pid, job_ids, keep)
    for ack_pid, job_ids in by_process(marks).items():
        statements.append((f"UPDATE {t.claimed.name} SET acked_at = %(now)s WHERE process_id = {int(ack_pid)} "
                           f"AND job_id IN ({_ints(job_ids)})", None))
    return statements


def _done(results: list[tuple[str | None, list]]) -> list[int]:
    return [row[0] for kind, rows in results if kind == "done" for row in rows]


def _finish(t: Tables, ack_pid: int, job_ids: Sequence[int], keep: bool) -> list[tuple[str, str | None]]:
    """Finishes of process ``ack_pid``: record them on the claims it still holds, drop those claims.

    Kept jobs (``keep``): one multi-table ``UPDATE`` joins the claims to their
    jobs, claims first (``STRAIGHT_JOIN``), so it locks each claim before its job, as
    the pruner does; it writes both (the claim's ``acked_at``, so that its lock is an
    exclusive one) and the jobs of claims this process no longer holds are not
    touched.  ``DELETE … RETURNING`` then drops those claims, still locked, and its
    rows are the answer: three statements where a locking ``SELECT`` made four.
    """
    c, j, k = t.claimed.name, t.jobs.name, t.unique_keys.name
    ids, pid = _ints(job_ids), int(ack_pid)
    held = f"EXISTS (SELECT 1 FROM {c} WHERE {c}.job_id = {{table}}.{{col}} AND {c}.process_id = {pid})"
    if keep:
        return [
            (f"UPDATE {c} STRAIGHT_JOIN {j} ON {j}.id = {c}.job_id "
             f"SET {c}.acked_at = COALESCE({c}.acked_at, %(now)s), {j}.finished_at = %(now)s, "
             f"{j}.deliveries = {j}.deliveries + 1 WHERE {c}.process_id = {pid} AND {c}.job_id IN ({ids})", None),
            (f"DELETE FROM {k} WHERE job_id IN ({ids}) AND {held.format(table=k, col='job_id')}", None),
            (f"DELETE FROM {c} WHERE process_id = {pid} AND job_id IN ({ids}) RETURNING job_id", "done")]
    # (the claim, the unique key and the rest go with the job row: ON DELETE CASCADE)
    return [(f"SELECT job_id FROM {c} WHERE process_id = {pid} AND job_id IN ({ids}) ORDER BY job_id FOR UPDATE", "done"),
            (f"DELETE FROM {j} WHERE id IN ({ids}) AND {held.format(table=j, col='id')}", None)]


def _claim(t: Tables, pid: int, limit: int) -> list[tuple[str, str | None]]:
    """Fence, take, and read back up to ``limit`` ready jobs of ``%(queue)s`` for process ``pid``."""
    r, c, j, k, p, q = (t.ready.name, t.claimed.name, t.jobs.name, t.unique_keys.name, t.processes.name,
                        t.pauses.name)
    mine = f"{c}.process_id = {pid} AND {c}.claimed_at = %(stamp)s"
    return [
        (f"SELECT id FROM {p} WHERE id = {pid} LOCK IN SHARE MODE", None),
        (f"INSERT INTO {c} (job_id, process_id, queue_name, claimed_at) "
         f"SELECT {r}.job_id, {pid}, {r}.queue_name, %(stamp)s FROM {r} "
         f"WHERE {r}.queue_name = %(queue)s "
         f"AND NOT EXISTS (SELECT 1 FROM {q} WHERE {q}.queue_name = %(queue)s) "
         f"AND EXISTS (SELECT 1 FROM {p} WHERE {p}.id = {pid}) "
         f"ORDER BY {r}.priority DESC, {r}.job_id LIMIT {limit} FOR UPDATE SKIP LOCKED", None),
        # The ready rows (locked by the claim above) and the keys held "while waiting", in one statement.
        (f"DELETE {r}, {k} FROM {c} STRAIGHT_JOIN {r} ON {r}.job_id = {c}.job_id "
         f"LEFT JOIN {k} ON {k}.job_id = {c}.job_id AND {k}.held_until = '{CLAIMED}' WHERE {mine}", None),
        (f"SELECT {j}.id, {j}.queue_name, {j}.priority, {j}.payload, {j}.deliveries + 1 "
         f"FROM {c} JOIN {j} ON {j}.id = {c}.job_id WHERE {mine}", "claimed"),
    ]


def _send(conn: Connection, statements: list[tuple[str, str | None]],
          params: dict[str, Any]) -> list[tuple[str | None, list]]:
    """Run ``statements`` as one packet on ``conn``'s transaction; each one's rows, tagged with its kind.

    Driver errors come back as SQLAlchemy's (``DBAPIError``), with the
    connection invalidated when it is gone, so the store's retry and reconnect
    rules apply as to any statement.
    """
    sql = ";\n".join(text for text, _ in statements)
    fairy = conn.connection
    cursor = fairy.cursor()
    results: list[tuple[str | None, list]] = []
    try:
        cursor.execute(sql, params)
        for index, (_, kind) in enumerate(statements):
            if index and not cursor.nextset():
                raise RuntimeError(f"the server answered {index} of {len(statements)} statements")
            results.append((kind, list(cursor.fetchall() or ())))
    except conn.dialect.loaded_dbapi.Error as exc:
        gone = conn.dialect.is_disconnect(exc, fairy.dbapi_connection, cursor)
        if gone:
            conn.invalidate(exc)
        raise DBAPIError.instance(sql, params, exc, conn.dialect.loaded_dbapi.Error,
                                  connection_invalidated=gone, dialect=conn.dialect) from exc
    finally:
        if not conn.invalidated:
            cursor.close()
    return results


def _loop_stamp(process_id: int, now: datetime) -> datetime:
    """``now``, moved a microsecond past the last stamp of ``process_id`` if need be: this loop's own mark."""
    with _stamps_lock:
        last = _stamps.get(process_id)
        if last is not None and now <= last:
            now = last + timedelta(microseconds=1)
        _stamps[process_id] = now
    return now


def _ints(values: Sequence[int]) -> str:
    """An id list written into the statement: each is forced through ``int``, so nothing else gets in."""
    return ", ".join(str(int(v)) for v in values)
