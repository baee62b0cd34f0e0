"""How result payloads are compressed, and how chord errors keep their cause.

Written against kombu's public compression registry (``kombu.compression``)
and Celery's public exception classes only, so that the backend runs on every
Celery of the declared range (5.5 to 5.7): Celery's own helpers for these
are private and moved between releases.

A compressed payload names its method in front of the body, in the layout
Celery 5.7's backends use::

    b"\\x00celery-compressed\\x00" + content type + b"\\x00" + compressed body

so results written by this backend, by an older release of it, or by any
Celery 5.7 backend that shares the layout read back the same.  The leading NUL
byte cannot start JSON, YAML, msgpack or pickle output, so an uncompressed
payload is never mistaken for a compressed one, and a reader decompresses by
what the payload says, whatever its own ``result_compression`` is.
"""
from __future__ import annotations

from celery.exceptions import ChordError, ImproperlyConfigured
from kombu import compression as kombu_compression

#: Marks a compressed payload (see the module docstring).
MAGIC = b"\x00celery-compressed\x00"


def compression_method(name: str | None) -> str | None:
    """The ``result_compression`` to write with (None: uncompressed), checked against kombu's registry."""
    if not name:
        return None
    try:
        kombu_compression.get_encoder(name)
    except KeyError:
        known = ", ".join(sorted(kombu_compression.encoders()))
        raise ImproperlyConfigured(
            f"result_compression={name!r} is not a compression method kombu knows; use one of: {known} "
            "(or leave it unset to store results uncompressed)") from None
    return name


def compress(payload: bytes, method: str | None) -> bytes:
    """``payload`` compressed with ``method`` and marked as such (unchanged when ``method`` is None)."""
    if not method:
        return payload
    body, content_type = kombu_compression.compress(payload, method)
    return MAGIC + content_type.encode("utf-8") + b"\x00" + body


def decompress(payload: bytes | memoryview) -> bytes:
    """The serialized result in ``payload``: decompressed if it is marked, as it is otherwise."""
    payload = bytes(payload)
    if not payload.startswith(MAGIC):
        return payload
    content_type, _, body = payload[len(MAGIC):].partition(b"\x00")
    return kombu_compression.decompress(body, content_type.decode("utf-8"))


def chord_error(message: str, cause: BaseException | None = None) -> ChordError:
    """A ChordError for the chord's body whose ``__cause__`` is what failed (shown in its traceback)."""
    error = ChordError(message)
    if isinstance(cause, Exception):
        error.__cause__ = cause
    return error
