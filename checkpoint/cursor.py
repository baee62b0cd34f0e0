"""Cursors and the progress that travels with a job between runs.

A cursor is "the position of the last processed item": resuming with it
starts *after* that item.  It travels in a message header and in the durable
store as JSON, so it must survive ``json.loads(json.dumps(c)) == c``.  A
datetime or a tuple silently turning into a string or a list is how iterative
jobs corrupt themselves (job-iteration #80), so we check at the first
checkpoint and fail loudly instead.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Optional

__all__ = ["CursorNotSerializableError", "InvalidCursorError", "validate_cursor", "Progress", "HEADER"]

#: Message header carrying :class:`Progress` (a JSON string) between runs.
HEADER = "checkpoint"


class CursorNotSerializableError(TypeError):
    """The enumerator produced a cursor that JSON cannot carry unchanged."""


class InvalidCursorError(ValueError):
    """A cursor that does not name a position of its enumerator (out of range, wrong type or shape).

    Resuming from it would silently skip or repeat items, so the job fails instead.
    """


def validate_cursor(cursor: Any) -> Any:
    """Return ``cursor`` if it survives a JSON round trip, else raise.

    >>> validate_cursor([3, "a"])
    [3, 'a']
    """
    try:
        encoded = json.dumps(cursor)
    except (TypeError, ValueError) as exc:
        raise CursorNotSerializableError(
            f"cursor {cursor!r} is not JSON serializable ({exc}); enumerators must yield cursors "
            "made of str, int, float, bool, None, lists and dicts with str keys"
        ) from exc
    decoded = json.loads(encoded)
    if decoded != cursor or not _same_shape(decoded, cursor):
        raise CursorNotSerializableError(
            f"cursor {cursor!r} does not survive a JSON round trip (it comes back as {decoded!r}); "
            "use lists instead of tuples, str keys, and convert dates/decimals/UUIDs to str or int"
        )
    return cursor


def _same_shape(a: Any, b: Any) -> bool:
    # == alone accepts (1, 2) vs [1, 2]? No, but it accepts 1 vs 1.0 and True vs 1.
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return all(_same_shape(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return all(_same_shape(a[k], b[k]) for k in a)
    return True


@dataclass
class Progress:
    """Where a job is, and how it got there.  Lives across runs.

    Attributes:
        cursor: position of the last processed item, ``None`` before the first.
        iterations: items processed over all runs (orders competing
            checkpoints: the one with more iterations is the newer).
        times_interrupted: clean stops so far (worker shutdown, max runtime, throttle).
        total_time: seconds spent iterating over all runs.
        total: iterations the whole job will take, when the enumerator can
            tell (ranges, sequences, row counts); counted once, by the first run.
        state: the durable row's state (running, interrupted, done, failed,
            revoked) when read from a store; not carried in messages.
    """

    cursor: Any = None
    iterations: int = 0
    times_interrupted: int = 0
    total_time: float = 0.0
    total: Optional[int] = None
    state: Optional[str] = None

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("state")
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: Optional[str]) -> Optional["Progress"]:
        if not text:
            return None
        data = json.loads(text)
        known = {k: data[k] for k in ("cursor", "iterations", "times_interrupted", "total_time", "total") if k in data}
        return cls(**known)

    @classmethod
    def newest(cls, *candidates: Optional["Progress"]) -> Optional["Progress"]:
        """The candidate with the most iterations (the message's or the store's)."""
        present = [c for c in candidates if c is not None]
        return max(present, key=lambda p: p.iterations, default=None)
