"""A connection pooler (PgBouncer) between us and PostgreSQL: what its mode allows, said in the URL.

Why the URL: the pooler is a property of the address a process connects to
(PgBouncer's port, not PostgreSQL's), and every part of the project that
connects (broker, result backend, ``celery sqlq``, the dashboard,
``checkpoint``'s store) starts from that URL, so they all learn it at once::

    sqlq+postgresql+psycopg://app@pgbouncer:6432/app?sqlq_pool_mode=transaction

The parameter is ours: it is taken out before the driver sees the URL.  A
pooler cannot be detected reliably from a client connection (it passes
``SHOW`` and the server's parameters through), so it is declared.

* ``session`` (the default, and what a direct connection is): a client keeps
  one server connection for as long as it is connected; everything works.
* ``transaction``: a client has a server connection only for the length of a
  transaction, then another client gets it.  What lives in a server session
  beyond one transaction is then wrong or lost, so in this mode the store
  sends no server-side prepared statements (psycopg 3's ``prepare_threshold``
  is turned off; psycopg2 has none), makes its settings per transaction
  (``SET LOCAL``, never ``SET``), and does not LISTEN through the pooler:
  ``listen_url`` names a direct connection for LISTEN, or idle workers and
  result waiters poll (one log line says so).  NOTIFY is sent inside the
  writing transaction and goes through the pooler as it is.
* ``statement``: refused.  A server connection changes hands after every
  statement, so no multi-statement transaction exists, and the store needs
  them (a claim fenced on its process, a job and its execution committed
  together).
"""
from __future__ import annotations

from typing import Any

from sqlalchemy.engine import URL, make_url

from ..errors import ConfigurationError

#: The URL query parameter that declares the pooler's mode.
PARAMETER = "sqlq_pool_mode"
MODES = ("session", "transaction")


def pool_mode(url: str | URL) -> str:
    """The declared pool mode of ``url``: ``session`` (also when undeclared) or ``transaction``."""
    parsed = make_url(url) if isinstance(url, str) else url
    mode = parsed.query.get(PARAMETER, "session")
    if isinstance(mode, tuple):
        mode = mode[-1]
    mode = str(mode).strip().lower()
    if mode == "statement":
        raise ConfigurationError(
            f"{PARAMETER}=statement is not supported: in statement pooling a server connection changes hands "
            "after every statement, so there are no multi-statement transactions, and the store needs them "
            "(a claim fenced on its process; a job and its execution committed together). Point the URL at a "
            f"pool in transaction mode ({PARAMETER}=transaction) or session mode, or at PostgreSQL itself")
    if mode not in MODES:
        raise ConfigurationError(f"{PARAMETER}={mode!r} is not a pool mode: write {PARAMETER}=transaction "
                                 "(PgBouncer's pool_mode=transaction) or session (the default)")
    if mode == "transaction" and parsed.get_backend_name() != "postgresql":
        raise ConfigurationError(f"{PARAMETER} is for PostgreSQL behind a pooler (PgBouncer), not "
                                 f"{parsed.get_backend_name()}; remove it from the URL")
    return mode


def driver_url(url: str | URL) -> URL:
    """``url`` without our parameter: what the driver is given."""
    parsed = make_url(url) if isinstance(url, str) else url
    return parsed.difference_update_query([PARAMETER]) if PARAMETER in parsed.query else parsed


def engine_arguments(url: str | URL) -> tuple[URL, dict[str, Any]]:
    """(URL for ``create_engine``, extra ``create_engine`` keywords) for ``url``'s pool mode.

    In transaction mode psycopg 3 must never prepare on the server: it prepares
    a statement after its fifth run on a connection, and the next run may go
    to a server connection that never saw it ("prepared statement does not
    exist"), while another client may find the name already taken.
    """
    parsed = make_url(url) if isinstance(url, str) else url
    extra: dict[str, Any] = {}
    if pool_mode(parsed) == "transaction" and parsed.get_driver_name() in ("psycopg", "psycopg_async"):
        extra["connect_args"] = {"prepare_threshold": None}
    return driver_url(parsed), extra


def per_transaction(settings: tuple[str, ...]) -> tuple[str, ...]:
    """Session settings (``SET name = value``) as the same settings for one transaction (``SET LOCAL``),
    sent as one statement (one round trip at the start of every transaction that needs them)."""
    local = [s.replace("SET ", "SET LOCAL ", 1) if s.upper().startswith("SET ") and
             not s.upper().startswith("SET LOCAL ") else s for s in settings]
    return ("; ".join(local),) if local else ()
