"""Is a registered process still running? Asked of the operating system, when it can answer.

Why: a worker killed with SIGKILL stops heartbeating, and a pruner waits
``alive_threshold`` (5 minutes by default) before taking its jobs back.  On the
same host that wait is needless: the operating system knows the PID is gone.
A PID alone is not proof, because PIDs are reused; so a process records, at
registration, what identifies *its* run of that PID: the boot, the PID
namespace (containers sharing a host name have separate ones) and the
process's start time.  A pruner on the same boot and in the same namespace
then knows for certain: no process with that PID, or one started at another
time, means the registered process is gone.

Linux only (``/proc``).  Elsewhere ``identity()`` is None and ``is_gone`` never
says yes: such processes are pruned by heartbeat age alone, as before.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

_PROC = Path("/proc")

#: States of /proc/<pid>/stat of a process that has ended but was not reaped yet.
_ENDED_STATES = {"Z", "X", "x"}


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


@lru_cache(maxsize=1)
def _namespace() -> str | None:
    """This machine's boot and this process's PID namespace, or None where /proc cannot tell."""
    boot = _read(_PROC / "sys/kernel/random/boot_id")
    try:
        pidns = os.readlink(_PROC / "self/ns/pid")
    except OSError:
        return None
    if not boot:
        return None
    return f"{boot.strip()}/{pidns}"


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of ``pid``, or None if there is no such process."""
    text = _read(_PROC / str(pid) / "stat")
    if text is None:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or parentheses itself.
    fields = text.rsplit(")", 1)[-1].split()
    if len(fields) < 20:
        return None
    return fields[0], fields[19]    # field 3 (state) and field 22 (starttime)


def identity(pid: int | None = None) -> str | None:
    """What identifies this run of ``pid`` (default: this process), or None where it cannot be known."""
    namespace = _namespace()
    stat = _stat(os.getpid() if pid is None else pid)
    if namespace is None or stat is None:
        return None
    return f"linux/{namespace}/{stat[1]}"


def is_gone(pid: int, recorded: str | None) -> bool:
    """True only when certain that the process registered with ``pid`` and ``recorded`` no longer runs.

    False when unsure: nothing recorded, another boot or PID namespace (another
    machine or container), or this platform cannot tell.
    """
    namespace = _namespace()
    if not recorded or namespace is None:
        return False
    prefix = f"linux/{namespace}/"
    if not recorded.startswith(prefix):
        return False
    stat = _stat(pid)
    if stat is None:
        return True                                  # no such PID
    state, started = stat
    return state in _ENDED_STATES or started != recorded[len(prefix):]   # ended, or a reused PID
