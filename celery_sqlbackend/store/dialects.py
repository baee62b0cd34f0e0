"""Everything that differs between database engines, in one place.

Callers ask *what* the database can do (``skip_locked``, ``returning``,
``notify``) and *whether an error is worth retrying*; they never test the
dialect name themselves.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

from sqlalchemy import Engine
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError


@dataclass(frozen=True, kw_only=True)
class Dialect:
    """What one database engine can do; built by keyword only (``dialect_of``)."""
    #: The SQLAlchemy dialect name: for messages and cache keys, never for a decision.
    name: str
    #: ``FOR UPDATE SKIP LOCKED`` exists (PostgreSQL, MySQL 8, MariaDB 10.6+).
    skip_locked: bool = False
    #: ``DELETE … RETURNING`` exists (PostgreSQL, SQLite >= 3.35, MariaDB).
    delete_returning: bool = False
    #: ``UPDATE … RETURNING`` exists (PostgreSQL, SQLite; not MySQL/MariaDB).
    update_returning: bool = False
    #: ``DELETE … WHERE id IN (SELECT … LIMIT n)`` is allowed (MySQL refuses it).
    delete_in_limited_subquery: bool = True
    #: LISTEN/NOTIFY wake-ups (PostgreSQL only).
    notify: bool = False
    #: The database is a file this process opens (SQLite): the store creates its
    #: own tables by default, and there is no server to ask for its settings.
    embedded: bool = False
    #: ``INSERT … ON CONFLICT DO UPDATE`` builder (``postgresql.insert`` /
    #: ``sqlite.insert``), or None: upserts update first, then insert (MySQL).
    insert_on_conflict: Callable[[Any], Any] | None = None
    #: DELETE/INSERT/UPDATE inside ``WITH`` (PostgreSQL): a claim loop is one statement.
    dml_cte: bool = False
    #: A one-statement transaction is sent without BEGIN/COMMIT (PostgreSQL,
    #: where each is a round trip to the server; a statement is atomic alone).
    autocommit_single: bool = False
    #: How a list of ids is bound in the claim loop's statements: ``"array"``
    #: (``col = ANY(:ids)``, PostgreSQL), ``"json"`` (``col IN (SELECT value FROM
    #: json_each(:ids))``, SQLite) or ``"expanding"`` (``IN (:ids_1, …)``).  One
    #: parameter means one SQL text for every list length: PostgreSQL's driver
    #: prepares it once and the server plans it once, and SQLAlchemy skips the
    #: per-execution rewrite of an expanding list (measured 40 µs a statement,
    #: a quarter of a SQLite claim loop).
    id_list: str = "expanding"
    #: The driver prepares statements on the server, which then plans them
    #: once for all parameter values (psycopg 3): a LIMIT goes in as a literal,
    #: so that the plan is made for the real limit.
    server_prepared: bool = False
    #: Settings for the connections a worker's threads keep for the claim loop and
    #: the heartbeat (``Store._own_connection``).  PostgreSQL: ``enable_sort = off``,
    #: so the claim walks the poll index in order whatever the statistics say.
    #: Without it, a ready table that has not been analysed yet (a new
    #: database, or one analysed while nearly empty) is planned as "fetch every
    #: ready row of the queue, sort, take n": measured 0.8 ms a claim with
    #: 2,400 waiting, against 0.05 ms for the index walk, and growing with the queue.
    #: And ``enable_seqscan = off``, for the same reason: the claim deletes its ready rows and
    #: updates its jobs by primary key, and statistics taken while those tables were small
    #: made both a sequential scan of the whole table, dead rows included (under a held
    #: snapshot, 2 → 13 ms a claim loop as 100,000 jobs flowed; ``bench/README.md``).
    #: And ``plan_cache_mode = force_generic_plan``: the claim loop is one prepared statement, and
    #: once an autoanalyze invalidates its plan, PostgreSQL's cost comparison may settle on a
    #: custom plan for every execution, planning the whole loop anew each time (measured: 1.1 ms
    #: of planning a loop, the loop from 1.8 to 3.5 ms, for the rest of the worker's life).
    own_connection_settings: tuple[str, ...] = ()
    #: Deliver through Celery's event loop (see ``eventloop``), which runs the
    #: prefork pool as ``AsynPool``: no pool threads in the worker's main process.
    event_loop: bool = False
    #: An idle poll reads before it claims (one plain SELECT): SQLite, where a
    #: claim takes the write lock, and MySQL/MariaDB, where idle workers poll (no
    #: NOTIFY) and a claim is a locking read, a fence and a commit.  Not PostgreSQL:
    #: NOTIFY wakes idle workers, and its claim is one round trip anyway.
    look_before_claim: bool = False
    #: In the event loop, claim on a thread of its own: where a claim is mostly a
    #: wait on a server (PostgreSQL).  Otherwise the hub's thread claims (SQLite,
    #: where a claim is CPU in this process, and a thread would only compete for the GIL;
    #: MariaDB, where whole-prefetch claims on the hub measured faster than the thread's).
    claim_thread: bool = False
    #: The claim loop goes to the server as one packet of statements
    #: (``claim_packet``): MariaDB, through a driver that sends several per packet.
    loop_packet: bool = False


def dialect_of(engine: Engine) -> Dialect:
    name = engine.dialect.name
    if name == "postgresql":
        return Dialect(name=name, skip_locked=True, delete_returning=True, update_returning=True,
                       notify=True, insert_on_conflict=postgresql.insert, dml_cte=True,
                       autocommit_single=True, id_list="array", server_prepared=True,
                       own_connection_settings=("SET enable_sort = off", "SET enable_seqscan = off",
                                                "SET plan_cache_mode = force_generic_plan"), event_loop=True,
                       claim_thread=True)
    if name == "sqlite":
        # SQLite serialises writers; BEGIN IMMEDIATE (engine.py) is its lock.
        return Dialect(name=name, delete_returning=True, update_returning=True, embedded=True, look_before_claim=True,
                       insert_on_conflict=sqlite.insert, event_loop=True,
                       id_list="json" if _sqlite_has_json() else "expanding")
    if name in ("mysql", "mariadb"):
        mariadb = _is_mariadb(engine)
        # Celery's event loop, the hub claiming a whole prefetch at a time (as on SQLite): with the
        # claim loop as one packet (claim_packet), it drained 1.2x faster than the blocking loop and
        # the claim thread alike, and with fewer, larger claims (see bench/README.md).  Measured again
        # with the one-round-trip packet (stop 18): a claim thread drains about as fast, and costs the
        # server half as much CPU again per job (its claims are smaller).
        return Dialect(name="mariadb" if mariadb else "mysql", skip_locked=True, delete_returning=mariadb,
                       delete_in_limited_subquery=False, look_before_claim=True, event_loop=True,
                       loop_packet=mariadb and sends_statement_packets(engine))
    return Dialect(name=name, look_before_claim=True)


def sends_statement_packets(engine: Engine) -> bool:
    """The driver's cursors take several statements in one packet and walk their results (``nextset``)."""
    return engine.dialect.name in ("mysql", "mariadb") and engine.dialect.driver in ("pymysql", "mysqldb")


def _is_mariadb(engine: Engine) -> bool:
    """MariaDB (``DELETE … RETURNING``) or MySQL: the driver knows only once it has connected.

    A URL spelled ``mariadb+…`` says so at once; otherwise one connection is
    opened to ask.  If the server cannot be reached now, MySQL's statements
    are used (they run on both).
    """
    if getattr(engine.dialect, "is_mariadb", None) is None or engine.dialect.server_version_info is None:
        try:
            with engine.connect():
                pass
        except DBAPIError:
            return engine.dialect.name == "mariadb"
    return bool(getattr(engine.dialect, "is_mariadb", False))


@functools.lru_cache(maxsize=None)
def _sqlite_has_json() -> bool:
    """True when this SQLite has ``json_each`` (built in since 3.38; an extension before)."""
    import sqlite3
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("SELECT value FROM json_each('[1]')").fetchall()
        return True
    except sqlite3.Error:
        return False
    finally:
        conn.close()


# Driver error codes that mean "the transaction lost a race; run it again", by cause.
_RETRYABLE_SQLSTATES = {"40001": "serialization failure", "40P01": "deadlock", "55P03": "lock not available"}
_RETRYABLE_MYSQL_CODES = {1205: "lock wait timeout", 1213: "deadlock"}
_RETRYABLE_SQLITE_TEXT = ("database is locked", "database table is locked", "database is busy")


def retry_cause(exc: BaseException) -> str | None:
    """Why a fresh transaction can win where this one lost (for the retry counts), or None."""
    if not isinstance(exc, DBAPIError) or exc.connection_invalidated:
        return None
    orig = exc.orig
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int) and args[0] in _RETRYABLE_MYSQL_CODES:   # (first: 1213 is SQLSTATE 40001)
        return _RETRYABLE_MYSQL_CODES[args[0]]
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if sqlstate in _RETRYABLE_SQLSTATES:
        return _RETRYABLE_SQLSTATES[sqlstate]
    if isinstance(exc, OperationalError) and any(t in str(orig).lower() for t in _RETRYABLE_SQLITE_TEXT):
        return "sqlite busy"
    return None


def is_retryable(exc: BaseException) -> bool:
    """True for lock conflicts that a fresh transaction can win."""
    return retry_cause(exc) is not None


def is_disconnect(exc: BaseException) -> bool:
    """True when the database connection is gone (worth reconnecting), not for SQL errors."""
    if isinstance(exc, DisconnectionError):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, InterfaceError):
        return True
    if isinstance(exc, OperationalError):
        orig = exc.orig
        sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
        if sqlstate:
            # 08: connection exception; 57P0x: server shutting down / crash.
            return sqlstate.startswith("08") or sqlstate.startswith("57P0")
        text = str(orig).lower()
        if "sqlite" in type(orig).__module__:
            return "unable to open database" in text or "disk i/o error" in text
        # psycopg connect failures and socket errors carry no SQLSTATE.
        return True
    return False
