"""Knowing, inside the process that runs a task, that the worker is stopping.

Two parts:

* :class:`StopFlag`, one byte of memory shared by the worker's main process
  and every pool child.  Celery tells only the *main* process that it is
  stopping (``worker_shutting_down`` is sent from its signal handler); prefork
  children never hear about it and simply get killed when the soft/hard wait is
  over.  A byte in a ``MAP_SHARED`` mapping created before the pool forks is
  the cheapest channel that reaches them: setting it is a single store (safe
  inside a signal handler, no lock, unlike ``multiprocessing.Value``) and
  reading it is a memory load.  Children forked later (``maxtasksperchild``,
  replacements) inherit the same mapping.

  Children started with the *spawn* method inherit nothing, so for them the
  worker moves the byte into a small file when it starts
  (:meth:`StopFlag.share_by_file`) and publishes the path in
  ``$CHECKPOINT_STOPFLAG``; a spawned child importing this module maps the
  same file.  Forking workers (the default) never create a file.

* A registry of interruption adapters, in the spirit of job-iteration's
  ``InterruptionAdapters``: an adapter is a zero-argument callable returning a
  falsy value (keep going) or a reason string (stop).  The built-in
  ``"celery"`` adapter reads the flag; tests and other frameworks register
  their own.
"""
from __future__ import annotations

import atexit
import mmap
import os
import tempfile
from typing import Callable, Optional, Union

__all__ = [
    "StopFlag", "FLAG", "stopping",
    "Adapter", "register", "unregister", "lookup", "registered",
    "UnknownAdapterError",
]

#: Environment variable through which spawned pool children find the flag file.
#: Value: ``"<owner pid>:<path>"``.
ENV_VAR = "CHECKPOINT_STOPFLAG"

_SIZE = mmap.PAGESIZE


class StopFlag:
    """A process-shared "the worker is stopping" bit.

    Create it in the worker main process before the pool starts (importing
    :mod:`checkpoint` from the app module does this).  ``set()`` may be called
    from a signal handler.
    """

    def __init__(self, path: Optional[str] = None) -> None:
        self.owner_pid = os.getpid()
        self.path = path
        self.attached = path is not None
        if path is None:
            self._buf = mmap.mmap(-1, _SIZE, flags=mmap.MAP_SHARED)
        else:
            self._buf = self._map(path)

    @staticmethod
    def _map(path: str) -> mmap.mmap:
        with open(path, "r+b") as fh:
            return mmap.mmap(fh.fileno(), _SIZE, flags=mmap.MAP_SHARED)

    def share_by_file(self) -> None:
        """Back the byte by a file, so that spawned children can map it too.

        Must run before the pool starts: processes forked earlier keep the
        old anonymous mapping.
        """
        if self.path is not None:
            return
        # /dev/shm keeps the page in RAM; any directory works.
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, path = tempfile.mkstemp(prefix="checkpoint-stopflag-", dir=base)
        try:
            os.write(fd, bytes([self._buf[0]]) + b"\0" * (_SIZE - 1))
        finally:
            os.close(fd)
        self.path = path
        self._buf = self._map(path)
        atexit.register(self._remove_if_owner)

    def _remove_if_owner(self) -> None:
        # Forked children run atexit handlers too (when they exit normally):
        # only the creator removes the file.
        if os.getpid() == self.owner_pid and not self.attached and self.path:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def set(self) -> None:
        """Mark the worker as stopping.  Async-signal-safe: one store."""
        self._buf[0] = 1

    def clear(self) -> None:
        self._buf[0] = 0

    def is_set(self) -> bool:
        return self._buf[0] == 1

    __bool__ = is_set

    def publish(self) -> None:
        """Let pool children started with *spawn* attach to this flag.

        Called when a spawning worker starts, not at import time: a ``celery
        worker`` subprocess started by a process that merely imported
        :mod:`checkpoint` must get its own flag, not its parent's.
        """
        self.share_by_file()
        os.environ[ENV_VAR] = f"{self.owner_pid}:{self.path}"

    @classmethod
    def for_this_process(cls) -> "StopFlag":
        """Attach to the parent's flag if we are its spawned child, else create one."""
        published = os.environ.get(ENV_VAR, "")
        pid, _, path = published.partition(":")
        if pid.isdigit() and int(pid) == os.getppid() and os.path.exists(path):
            return cls(path)
        return cls()


#: The flag of this process; shared with prefork children by inheritance.
FLAG = StopFlag.for_this_process()


def stopping() -> bool:
    """True once the worker running this code has been asked to stop."""
    return FLAG.is_set()


# -- adapter registry -------------------------------------------------------

#: An adapter answers "should the running job stop now?": falsy, True, or a reason.
Adapter = Callable[[], Union[None, bool, str]]

_ADAPTERS: dict[str, Adapter] = {}


class UnknownAdapterError(LookupError):
    """Raised by :func:`lookup` for a name nobody registered."""


def register(name: str, adapter: Adapter) -> Adapter:
    """Register ``adapter`` under ``name`` (replacing any previous one).

    Example::

        checkpoint.register_adapter("deploy", lambda: "deploying" if DEPLOYING else None)
    """
    if not callable(adapter):
        raise TypeError(f"interruption adapter {name!r} must be callable, got {adapter!r}")
    _ADAPTERS[name] = adapter
    return adapter


def unregister(name: str) -> None:
    _ADAPTERS.pop(name, None)


def lookup(name: str) -> Adapter:
    try:
        return _ADAPTERS[name]
    except KeyError:
        raise UnknownAdapterError(
            f"no interruption adapter named {name!r}; registered: {sorted(_ADAPTERS)}"
        ) from None


def registered() -> list[str]:
    return sorted(_ADAPTERS)


def _celery_adapter() -> Optional[str]:
    return "worker_stopping" if FLAG.is_set() else None


register("celery", _celery_adapter)
