"""LISTEN connections to PostgreSQL, through psycopg 3 or psycopg2.

Why: a deployment has one of the two drivers, and a worker woken only by its
poll waits 10 times longer for a job.  ``notify`` needs one thing from a
driver: a dedicated autocommit connection that LISTENs on a channel and hands
over the payloads that arrived, waiting up to a timeout for the first.  Both
drivers can (psycopg 3: ``Connection.notifies``; psycopg2: ``select`` on the
connection, then ``poll()`` and ``notifies``).  The store's own driver is
preferred; with neither installed, ``listener_driver`` says once what to
install, and the callers poll.
"""
from __future__ import annotations

import importlib
import logging
import select
from typing import Any, Protocol

log = logging.getLogger("celery_sqlbackend.notify")

#: What to install for LISTEN/NOTIFY, per driver module (the package's extras).
INSTALL = {"psycopg": "pip install 'celery-sqlbackend[postgres]'  (psycopg 3)",
           "psycopg2": "pip install 'celery-sqlbackend[postgres2]'  (psycopg2)"}

_warned = False


class Listener(Protocol):
    def wait(self, timeout: float) -> list[str]: ...
    def close(self) -> None: ...


class Psycopg3Listener:
    """An autocommit psycopg 3 connection LISTENing on one channel."""

    def __init__(self, params: dict[str, str], channel: str):
        import psycopg
        self.conn = psycopg.connect(autocommit=True, **params)
        self.conn.execute(f'LISTEN "{channel}"')   # quoted: the prefix keeps its case

    def wait(self, timeout: float) -> list[str]:
        got = [n.payload for n in self.conn.notifies(timeout=timeout, stop_after=1)]
        if got:   # drain whatever else arrived, so that the next wait does not return at once
            got += [n.payload for n in self.conn.notifies(timeout=0)]
        return got

    def close(self) -> None:
        self.conn.close()


class Psycopg2Listener:
    """An autocommit psycopg2 connection LISTENing on one channel.

    ``select`` (made green by gevent and eventlet) waits for the socket;
    ``poll()`` reads what arrived, and raises if the connection is gone.
    """

    def __init__(self, params: dict[str, str], channel: str):
        import psycopg2
        self.conn = psycopg2.connect(**params)
        self.conn.autocommit = True
        with self.conn.cursor() as cur:
            cur.execute(f'LISTEN "{channel}"')

    def wait(self, timeout: float) -> list[str]:
        conn = self.conn
        conn.poll()
        if not conn.notifies:
            readable, _, _ = select.select([conn], [], [], max(timeout, 0))
            if readable:
                conn.poll()
        got = [n.payload for n in conn.notifies]
        del conn.notifies[:]
        return got

    def close(self) -> None:
        self.conn.close()


_CLASSES = {"psycopg": Psycopg3Listener, "psycopg2": Psycopg2Listener}


def listener_driver(store_driver: str) -> str | None:
    """The driver module to LISTEN with: the store's own if it is one of ours, else whichever is installed.

    None (and a warning, once per process, naming what to install) when neither is.
    """
    global _warned
    first = "psycopg2" if store_driver.startswith("psycopg2") else "psycopg"
    for module in (first, "psycopg2" if first == "psycopg" else "psycopg"):
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        return module
    if not _warned:
        _warned = True
        log.warning("PostgreSQL LISTEN/NOTIFY needs psycopg 3 or psycopg2, and neither is installed: "
                    "workers and result waiters poll instead (slower wake-ups). Install one: %s, or %s",
                    INSTALL["psycopg"], INSTALL["psycopg2"])
    return None


def listen(driver: str, params: dict[str, str], channel: str) -> Any:
    """A new LISTENing connection through ``driver`` ("psycopg" or "psycopg2"); ``params``: libpq's keywords."""
    return _CLASSES[driver](params, channel)
