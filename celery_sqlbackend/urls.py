"""URLs: ``sqlq+<SQLAlchemy URL>``, ``sqlq://`` and the passwords they carry.

One place that knows the scheme, so that the broker, the result backend, the
tools and ``checkpoint`` agree on what a URL means:

* ``sqlq+postgresql+psycopg://user:pw@db/app`` is the broker (or backend)
  in that database; ``database_url`` strips the prefix.
* ``sqlq://`` (or ``sqlq``) as a result backend means "the broker's
  database" (``backend_database_url``).
* Every URL shown in a message or a log line goes through ``mask``: a
  password never leaves the process in text.
"""
from __future__ import annotations

import re
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from .errors import ConfigurationError

#: The kombu transport name; ``sqlq+`` in front of an SQLAlchemy URL selects it.
SCHEME = "sqlq"
PREFIX = SCHEME + "+"

_EXAMPLES = "'sqlq+sqlite:///path/jobs.sqlite3' or 'sqlq+postgresql+psycopg://user:pass@host/db'"
_USERINFO = re.compile(r"(?P<head>[a-z][a-z0-9+.\-]*://[^:/@\s]*):(?P<pw>[^/\s]*)@", re.IGNORECASE)


def is_sqlq(url: Any) -> bool:
    """True for an ``sqlq+<SQLAlchemy URL>`` string."""
    return isinstance(url, str) and url.startswith(PREFIX)


def database_url(url: str) -> str:
    """The SQLAlchemy URL in ``url``: ``sqlq+`` stripped if present, anything else unchanged."""
    return url[len(PREFIX):] if url.startswith(PREFIX) else url


def broker_url(conf: Any) -> str:
    """The app's ``broker_url`` as one string (kombu accepts a list of fail-over URLs: the first)."""
    url = conf.get("broker_url") if hasattr(conf, "get") else getattr(conf, "broker_url", None)
    if isinstance(url, (list, tuple)):
        url = url[0] if url else ""
    return url if isinstance(url, str) else ""


def broker_database_url(conf: Any) -> str | None:
    """The database of the app's broker, or None if the broker is not ``sqlq+``."""
    url = broker_url(conf)
    return database_url(url) if is_sqlq(url) else None


def backend_database_url(url: str | None, conf: Any) -> str:
    """The database of a ``result_backend`` URL; ``sqlq://`` (or none) means the broker's."""
    if url and not url.startswith(SCHEME + ":") and url != SCHEME:
        return database_url(url)
    broker = broker_database_url(conf)
    if broker is None:
        raise ConfigurationError(
            f"result_backend={mask(url or SCHEME)!r} means 'the database of the sqlq broker', but "
            f"broker_url is {mask(broker_url(conf))!r}; write result_backend='sqlq+<SQLAlchemy URL>', e.g. "
            "'sqlq+sqlite:///jobs.sqlite3' or 'sqlq+postgresql+psycopg://user@db/app'")
    return broker


def mask(url: Any) -> str:
    """``url`` with its password replaced by ``***``: the only way a URL goes into a message or log."""
    text = str(url)
    if hasattr(url, "render_as_string"):
        return url.render_as_string(hide_password=True)
    return _USERINFO.sub(lambda m: f"{m.group('head')}:***@", text)


def validate(url: str) -> str:
    """Check an SQLAlchemy URL early, with an error that says what to write (and shows no password)."""
    shown = mask(url)
    try:
        parsed = make_url(url)
        parsed.get_dialect()
    except (ArgumentError, ValueError) as exc:
        raise ConfigurationError(
            f"{shown!r} is not an SQLAlchemy database URL ({mask(exc)}). Write the broker URL as "
            f"{_EXAMPLES}") from None
    except NoSuchModuleError as exc:
        raise ConfigurationError(
            f"no SQLAlchemy dialect for {shown!r} ({mask(exc)}). Write the broker URL as {_EXAMPLES}, "
            "and install the driver (pip install 'celery-sqlbackend[postgres]')") from None
    except ImportError as exc:
        raise ConfigurationError(
            f"the database driver for {shown!r} is not installed ({mask(exc)}); for PostgreSQL: "
            "pip install 'celery-sqlbackend[postgres]'") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ConfigurationError(
            "an in-memory SQLite database cannot be shared between a producer and a worker; "
            "give it a file: 'sqlq+sqlite:///jobs.sqlite3'")
    return url


_LOCAL_HOSTS = {None, "", "localhost", "127.0.0.1", "::1"}
_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306}


def same_database(a: Any, b: Any) -> bool:
    """True when SQLAlchemy URLs ``a`` and ``b`` name the same database (drivers may differ).

    SQLite: the same file (resolved path; an in-memory database is never the
    same as another).  Servers: the same backend, database, port and host,
    the local names of this machine counting as one.
    """
    import os
    a, b = make_url(a), make_url(b)
    if a.get_backend_name() != b.get_backend_name():
        return False
    if a.get_backend_name() == "sqlite":
        paths = [u.database for u in (a, b)]
        if any(p in (None, "", ":memory:") for p in paths):
            return False
        return os.path.realpath(paths[0]) == os.path.realpath(paths[1])
    hosts = [None if u.host in _LOCAL_HOSTS else u.host.lower() for u in (a, b)]
    default = _DEFAULT_PORTS.get(a.get_backend_name())
    return a.database == b.database and hosts[0] == hosts[1] and (a.port or default) == (b.port or default)
