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

import importlib
import os
import re
from typing import Any
from urllib.parse import unquote

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from .errors import ConfigurationError

#: The kombu transport name; ``sqlq+`` in front of an SQLAlchemy URL selects it.
SCHEME = "sqlq"
PREFIX = SCHEME + "+"

_EXAMPLES = "'sqlq+sqlite:///path/jobs.sqlite3' or 'sqlq+postgresql+psycopg://user:pass@host/db'"
_USERINFO = re.compile(r"(?P<head>(?:[a-z][a-z0-9+.\-]*:)?//[^:/@\s'\"]*):(?P<pw>[^\s'\"]*)@", re.IGNORECASE)
_OURS = re.compile(r"\s*sqlq(?![a-z0-9_\-.])", re.IGNORECASE)   # sqlq, sqlq+…, sqlq:…, but not sqlqueue://
_SCHEME_START = re.compile(r"[a-z][a-z0-9+.\-]*://", re.IGNORECASE)
#: Passwords seen in URLs by this process (``remember``): masked wherever they turn up in a message.
_SECRETS: set[str] = set()


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
    """``url`` (or a message holding URLs) with passwords replaced by ``***``: the only way a URL goes
    into a message or a log line.

    A whole URL string is masked by its structure (the userinfo runs to its last ``@``, whatever the
    password holds: ``/``, ``@``, ``#``, spaces); in free text every URL-like token is, and every
    password this process has seen in a URL (``remember``) is replaced wherever it appears.
    """
    if hasattr(url, "render_as_string"):
        return url.render_as_string(hide_password=True)
    text = str(url)
    if isinstance(url, str) and (_SCHEME_START.match(text) or not any(c.isspace() for c in text)):
        remember(url)           # a URL (a message would not start with a scheme, or has spaces)
        text = _mask_whole(text)
    text = _USERINFO.sub(lambda m: f"{m.group('head')}:***@", text)
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def remember(url: str) -> None:
    """Note the password of ``url`` (raw and percent-decoded), so that no later message shows it."""
    password = _password_of(url)
    if password:
        _SECRETS.update(p for p in (password, unquote(password)) if len(p) >= 3)


def _userinfo_span(text: str) -> tuple[int, int] | None:
    """Where the password of a URL string is (start, end), if it has one."""
    scheme_end = text.find("://")
    start = scheme_end + 3 if scheme_end >= 0 else 0
    at = text.rfind("@", start)
    if at < 0:
        return None
    colon = text.find(":", start, at)
    return (colon + 1, at) if colon >= 0 else None


def _password_of(text: str) -> str | None:
    span = _userinfo_span(text)
    return text[span[0]:span[1]] if span else None


def _mask_whole(text: str) -> str:
    span = _userinfo_span(text)
    return text if span is None else f"{text[:span[0]]}***{text[span[1]:]}"


def postgres_driver(parsed: URL) -> URL:
    """A plain ``postgresql://`` URL with the PostgreSQL driver that is installed.

    Why: SQLAlchemy's default driver for ``postgresql://`` is psycopg2 up to 2.0
    and psycopg 3 from 2.1, so the same URL would fail on one or the other
    depending on the SQLAlchemy release.  An explicit ``+driver`` is kept as written.
    """
    if "+" in parsed.drivername:
        return parsed
    for driver in ("psycopg", "psycopg2"):
        try:
            importlib.import_module(driver)
        except ImportError:
            continue
        return parsed.set(drivername=f"postgresql+{driver}")
    return parsed


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
        raise ConfigurationError(_missing_driver(shown, parsed, exc)) from None
    if parsed.get_backend_name() == "postgresql":
        parsed = postgres_driver(parsed)   # (what the engine will use)
    try:
        parsed.get_dialect().import_dbapi()
    except ImportError as exc:
        raise ConfigurationError(_missing_driver(shown, parsed, exc)) from None
    if parsed.get_backend_name() == "sqlite":
        _check_sqlite_file(parsed.database)
    return url


#: The extra that installs a supported driver, per database.
_EXTRAS = {"postgresql": ("postgres", "postgresql+psycopg://"), "mysql": ("mysql", "mysql+pymysql://"),
           "mariadb": ("mysql", "mariadb+pymysql://")}


def _missing_driver(shown: str, parsed: Any, exc: BaseException) -> str:
    backend = parsed.get_backend_name()
    extra, scheme = _EXTRAS.get(backend, (None, None))
    advice = (f"install the supported one: pip install 'celery-sqlbackend[{extra}]', and write the URL as "
              f"'sqlq+{scheme}…'" if extra else "install the driver this URL names")
    return f"the database driver for {shown!r} is not installed ({mask(exc)}); {advice}"


def _check_sqlite_file(database: str | None) -> None:
    """An SQLite file this process can create and write, or an error that says which directory to fix."""
    if database in (None, "", ":memory:"):
        raise ConfigurationError(
            "an in-memory SQLite database cannot be shared between a producer and a worker; "
            "give it a file: 'sqlq+sqlite:///jobs.sqlite3'")
    if database.startswith("file:"):
        return      # a URI filename (?uri=true): SQLite reads its options itself
    path = os.path.abspath(database)
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise ConfigurationError(
            f"the SQLite database {path!r} cannot be created: its directory {directory!r} does not exist; "
            "create the directory, or write a path in an existing one (sqlq+sqlite:///relative/path or "
            "sqlq+sqlite:////absolute/path)")
    if os.path.exists(path):
        if not os.access(path, os.R_OK | os.W_OK):
            raise ConfigurationError(
                f"the SQLite database {path!r} is not writable by this user; give the worker's user "
                "read and write access to it (and to its directory, for the journal)")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigurationError(
            f"the SQLite database {path!r} cannot be written: its directory {directory!r} is not writable by "
            "this user (SQLite writes its journal beside the file); make it writable, or move the database")


def broker_url_problem(url: Any) -> str | None:
    """What is wrong with a ``broker_url`` meant for this transport, or None (also None if not ours).

    kombu reads ``sqlq`` alone, ``sqlq+`` with nothing after it and ``sqlq:/path`` as AMQP host
    names and retries them for ever; they are caught here, with what to write instead.
    """
    if not isinstance(url, str) or not _OURS.match(url):
        return None
    if is_sqlq(url) and len(url) > len(PREFIX):
        try:
            validate(database_url(url))
        except ConfigurationError as exc:
            return str(exc)
        return None
    rest = url.split(":", 1)[1].lstrip("/") if ":" in url else ""
    guess = f" (for this file: 'sqlq+sqlite:///{rest}')" if rest and "@" not in rest else ""
    return (f"broker_url {mask(url)!r} is not an sqlq URL: write 'sqlq+' followed by an SQLAlchemy URL, "
            f"e.g. {_EXAMPLES}{guess}")


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
