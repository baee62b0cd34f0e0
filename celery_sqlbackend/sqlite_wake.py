"""Waking idle SQLite workers at commit, through unix datagram sockets beside the database file.

Why: SQLite has no NOTIFY, so an idle worker found a new job only at its next
poll (p50 ~80 ms at the default interval).  Every process that writes a
SQLite file runs on the same host (SQLite over a network filesystem is not
supported), so a same-host channel can do what NOTIFY does on PostgreSQL.

The channel: a directory ``<database file>.sqlq-wake/`` holding one unix
datagram socket per worker process (``<pid>-<token>``), bound when the
worker first waits for work (``waiter_for``) and removed when it exits.  A
transaction that makes a job ready (``store.executions.notify_ready``, the
one place every enqueue, batch, promotion and release goes through) marks its
connection; when that connection commits, this module sends one byte to each
socket in the directory.  The poll stays the fallback: a lost byte (a full
socket buffer, a worker that bound a moment too late) costs one polling
interval, never a job.

Why datagram sockets rather than FIFOs: a send is one non-blocking system
call with no open/close, wakes are coalesced by the receiver (it drains all
it has before one claim round), and a dead receiver is detected for free:
sending to the socket file of a process that is gone fails with
``ECONNREFUSED``, whereupon the publisher deletes that file, so a worker
killed with SIGKILL leaves nothing that slows or breaks publishing.  (A FIFO
needs an open per publish, and its stale entries look like live ones until
an open with O_NONBLOCK fails.)  The token after the pid keeps a publisher
that found a dead process's socket from deleting the socket of a new process
that got the same pid.  Paths longer than a unix socket address allows
(~107 bytes, easy under deep temporary directories) are reached through
``/proc/self/fd/<directory fd>/<name>``.

Waking *after* the commit: SQLAlchemy's ``commit`` event fires before the
driver's commit, and a worker woken then could look before the rows are
visible and go back to sleep for a whole poll.  So the handler commits the
sqlite3 connection itself, then sends; SQLAlchemy's own commit that follows
finds no transaction open and does nothing (a failed early commit sends
nothing and lets SQLAlchemy's commit raise as usual).  This covers
``enqueue_in`` too: the caller's Session or Connection commits through the
same event, on whichever Engine it was made.  A rollback sends nothing.

In-memory databases (and temporary ones) have no file and no other process:
workers poll.  On by default; with ``sqlite_wake=False`` a worker makes no
socket and polls (a publisher wakes only where the directory exists, that is
where some worker waits on it).
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import os
import secrets
import select
import socket
import sqlite3
import threading
from typing import Any

from sqlalchemy import Connection, Engine, event

log = logging.getLogger("celery_sqlbackend.notify")

SUFFIX = ".sqlq-wake"
#: ``Connection.info`` keys (kept per DBAPI connection): the wake directory, and a wake owed at commit.
_DIR_KEY = "sqlq_wake_dir"
_PENDING_KEY = "sqlq_wake_pending"
#: Longest path a unix socket address takes (``sun_path`` is 108 bytes with its NUL).
_MAX_ADDRESS = 107


def wake_dir(conn: Connection) -> str | None:
    """The wake directory of ``conn``'s database file, or None for an in-memory or temporary one.

    Asked of SQLite itself (``PRAGMA database_list``), so relative paths and URI filenames
    resolve as SQLite resolved them; kept per DBAPI connection.
    """
    info = conn.info
    cached = info.get(_DIR_KEY)
    if cached is None:
        files = {row[1]: row[2] for row in conn.exec_driver_sql("PRAGMA database_list")}
        path = files.get("main") or ""
        cached = info[_DIR_KEY] = (os.path.realpath(path) + SUFFIX) if path else ""
    return cached or None


# --------------------------------------------------------------------------- publishing side

def wake_at_commit(conn: Connection) -> None:
    """Wake the workers waiting on ``conn``'s database when its transaction commits (SQLite)."""
    directory = wake_dir(conn)
    if directory is None or not os.path.isdir(directory):
        return       # no worker has ever waited here: leave the commit alone
    conn.info[_PENDING_KEY] = directory
    _watch(conn.engine)


def _watch(engine: Engine) -> None:
    if not event.contains(engine, "commit", _on_commit):
        with _watch_lock:
            if not event.contains(engine, "commit", _on_commit):
                event.listen(engine, "commit", _on_commit)
                event.listen(engine, "rollback", _on_rollback)


_watch_lock = threading.Lock()


def _on_rollback(conn: Connection) -> None:
    conn.info.pop(_PENDING_KEY, None)


def _on_commit(conn: Connection) -> None:
    directory = conn.info.pop(_PENDING_KEY, None)
    if directory is None:
        return
    dbapi = conn.connection.dbapi_connection
    if isinstance(dbapi, sqlite3.Connection):
        try:
            dbapi.commit()     # (see the module doc: the event fires before the driver's commit)
        except Exception:
            return             # SQLAlchemy's own commit raises it; nothing committed, nobody to wake
    wake(directory)


_sender: tuple[int, socket.socket] | None = None


def _sending_socket() -> socket.socket:
    global _sender
    sender = _sender
    if sender is None or sender[0] != os.getpid():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sender = _sender = (os.getpid(), sock)
    return sender[1]


def wake(directory: str) -> int:
    """Send one byte to every worker socket in ``directory``, deleting those of dead processes;
    returns how many were sent."""
    try:
        names = os.listdir(directory)
    except OSError:
        return 0        # no worker has waited on this database yet
    sock = _sending_socket()
    sent = 0
    with _Addresses(directory) as address:
        for name in names:
            path = address(name)
            try:
                sock.sendto(b"\0", path)
                sent += 1
            except (BlockingIOError, InterruptedError):
                sent += 1    # its buffer is full of wakes it has not read yet: it is awake anyway
            except ConnectionRefusedError:
                with contextlib.suppress(OSError):    # nobody bound: its process is gone
                    os.unlink(path)
                    log.debug("removed the wake socket %s of a process that is gone", name)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTSOCK, errno.EACCES, errno.EPERM):
                    log.debug("could not wake %s (%s)", name, exc)
    return sent


class _Addresses:
    """Socket addresses of names in a directory: the path itself, or through the directory's fd if too long."""

    def __init__(self, directory: str):
        self.directory = directory
        self.fd: int | None = None

    def __enter__(self):
        return self.address

    def address(self, name: str) -> str:
        path = os.path.join(self.directory, name)
        if len(os.fsencode(path)) <= _MAX_ADDRESS:
            return path
        if self.fd is None:
            self.fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        return f"/proc/self/fd/{self.fd}/{name}"

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)


# --------------------------------------------------------------------------- waiting side

class SqliteWaker:
    """This process's wake socket: what ``notify.NotifyWaiter`` is on PostgreSQL.

    ``wait(timeout)`` for the blocking loop; ``fileno()`` and ``drain()`` for
    the event loop's hub, which watches the socket among its other readers.
    """

    def __init__(self, directory: str):
        self.directory = directory
        self.pid = os.getpid()
        self.name = f"{self.pid}-{secrets.token_hex(4)}"
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, self.name)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            with _Addresses(directory) as address:
                self.sock.bind(address(self.name))
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self) -> bool:
        """Read every wake that arrived; True if there was any."""
        woken = False
        while True:
            try:
                self.sock.recv(64)
            except (BlockingIOError, InterruptedError):
                return woken
            except OSError:
                return woken
            woken = True

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds; True if woken (a job became ready meanwhile)."""
        if self.drain():
            return True
        with contextlib.suppress(OSError, ValueError):
            readable, _, _ = select.select([self.sock], [], [], max(timeout, 0))
            if readable:
                return self.drain()
        return False

    def close(self) -> None:
        """Stop being woken: delete the socket file (only in the process that bound it)."""
        if os.getpid() == self.pid:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        with contextlib.suppress(OSError):
            self.sock.close()


_wakers: dict[tuple[str, int], SqliteWaker] = {}
_wakers_lock = threading.Lock()


def waiter_for(engine: Engine) -> SqliteWaker | None:
    """This process's waker for the SQLite file of ``engine``; None for an in-memory database,
    or if the socket cannot be made (then the workers poll, and the log says why)."""
    with engine.connect() as conn:
        directory = wake_dir(conn)
    if directory is None:
        return None
    key = (directory, os.getpid())
    with _wakers_lock:
        waker = _wakers.get(key)
        if waker is None:
            try:
                waker = _wakers[key] = SqliteWaker(directory)
            except OSError as exc:
                log.warning("no wake-ups for SQLite workers (cannot make a socket in %s: %s): "
                            "idle workers poll", directory, exc)
                return None
    return waker


def _close_all() -> None:
    for (_, pid), waker in list(_wakers.items()):
        if pid == os.getpid():
            waker.close()


def _forget_in_child() -> None:
    """A forked child (a pool process) closes its copies of the parent's sockets: a process that still
    held one would keep a dead worker's socket answering, and its file would never be deleted."""
    for key, waker in list(_wakers.items()):
        with contextlib.suppress(OSError):
            waker.sock.close()
        del _wakers[key]


atexit.register(_close_all)
os.register_at_fork(after_in_child=_forget_in_child)
