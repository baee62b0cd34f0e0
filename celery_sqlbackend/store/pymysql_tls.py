"""PyMySQL's "preferred" TLS context, built once per process instead of once per connection.

Why: since PyMySQL 1.2 (PyMySQL #1213/#1234) a connection given no TLS settings tries TLS if
the server offers it ("preferred" mode), and to be ready for that every ``connect()`` builds a
fresh ``ssl.create_default_context()``, which parses the system's whole CA bundle (OpenSSL 3
does that slowly): measured here 40 ms of CPU per connection against 3 ms for the rest of the
connect, 145 ms of wall time on a loaded two-core machine.  Preferred mode verifies nothing
(no CA given: ``CERT_NONE``, no host name check), so those certificates are never read.
Workers, their pool children, CLI commands and the result backend open connections all the
time (pools refill, forked children start with empty pools, NullPool engines connect per
call): on MariaDB that CPU was most of what a test run did besides the tasks themselves.

What: an engine on ``mysql+pymysql``/``mariadb+pymysql`` connects through a ``Connection``
subclass whose preferred-mode context is built once, by PyMySQL's own code, and then shared
(an ``SSLContext`` may serve any number of connections and threads; a forked child inherits
it).  Explicit TLS settings (``ssl_ca``, ``ssl=…``, ``ssl_disabled``, an option file's
``ssl-*``) take PyMySQL's own path unchanged, and so does a PyMySQL without preferred mode
(before 1.2 it builds no context unless asked).
"""
from __future__ import annotations

import threading
from typing import Any, Optional

from sqlalchemy import Engine, event

__all__ = ["install", "connection_class", "warm"]

_lock = threading.Lock()
_context: Any = None
_class: Optional[type] = None


def _preferred_context(build) -> Any:
    global _context
    if _context is None:
        with _lock:
            if _context is None:
                _context = build()
    return _context


def connection_class() -> Optional[type]:
    """PyMySQL's ``Connection`` with a shared preferred-mode context, or None (no PyMySQL, or one
    that builds its contexts differently: then there is nothing to share)."""
    global _class
    if _class is None:
        try:
            from pymysql.connections import Connection
        except ImportError:
            return None
        if not callable(getattr(Connection, "_create_ssl_ctx", None)):
            return None

        class SharedTLSContextConnection(Connection):
            """Preferred mode (PyMySQL passes ``{}``): one context per process; anything else: PyMySQL's."""

            def _create_ssl_ctx(self, sslp):
                if isinstance(sslp, dict) and not sslp:
                    return _preferred_context(lambda: Connection._create_ssl_ctx(self, {}))
                return super()._create_ssl_ctx(sslp)

        _class = SharedTLSContextConnection
    return _class


def install(engine: Engine) -> Engine:
    """Make ``engine`` connect through ``connection_class()`` if it is a PyMySQL engine; returns it."""
    if engine.dialect.driver != "pymysql":
        return engine
    cls = connection_class()
    if cls is None:
        return engine

    @event.listens_for(engine, "do_connect")
    def _connect(_dialect, _record, cargs, cparams):
        return cls(*cargs, **cparams)

    return engine


def warm() -> None:
    """Build the shared context now (a process that forks workers: its children inherit it)."""
    cls = connection_class()
    if cls is not None:
        cls.__new__(cls)._create_ssl_ctx({})   # (no connection made: only the context is built)
