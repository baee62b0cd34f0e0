"""``@throttle_on(backoff=...)``: a throttle declared in an IterativeTask's class body.

Why a decorator: ``Backfill.throttle_on(condition)`` can only run after the
class exists, away from the code it governs; job-iteration users declare
throttles inside the class.  A method marked here is collected when the
class is defined (``IterativeTask.__init_subclass__``), applies to that class
and its subclasses, and is called with the task before each item::

    class Backfill(IterativeTask):
        @throttle_on(backoff=60)
        def replica_lagging(self):
            return replica_lag() > 5
"""
from __future__ import annotations

from typing import Callable, TypeVar

__all__ = ["throttle_on", "THROTTLE_MARK"]

#: Attribute a throttle method carries: its backoff in seconds.
THROTTLE_MARK = "__checkpoint_throttle_backoff__"

F = TypeVar("F", bound=Callable[..., bool])


def throttle_on(backoff: float = 30.0) -> Callable[[F], F]:
    """Mark a method as a throttle: while it returns true the job re-enqueues itself ``backoff`` s later."""
    if callable(backoff):
        raise TypeError("use @throttle_on(backoff=seconds) with parentheses (or @throttle_on())")
    seconds = float(backoff)
    if seconds < 0:
        raise ValueError(f"throttle backoff must be >= 0 seconds, got {backoff!r}")

    def mark(method: F) -> F:
        setattr(method, THROTTLE_MARK, seconds)
        return method
    return mark
