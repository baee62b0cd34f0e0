"""What a worker cannot turn into a task, found before Celery sees it.

Why here, in the transport: Celery's consumer handles some bad messages
(an unknown task name is rejected), but not all of them.  A body that does
not decode is *acked* (the job would be recorded finished), and a body of the
wrong shape, or headers or ``delivery_info`` that are not mappings, raise out
of its message handler: the worker exits "Unrecoverable error", and every
restart claims the same message and crashes again.  Checking a claimed
message here lets the channel file it as a failed execution with a reason
that says what is wrong, and deliver the rest of its batch.

The check decodes the body once more than Celery will (Celery decodes it
again in the worker's main process); that is the price of never crashing on it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Collection

from kombu.exceptions import ContentDisallowed
from kombu.serialization import loads

from .errors import MalformedMessageError, RefusedContentError, UndecodableMessageError

#: The ``error_class`` and reason of a message a worker cannot run.
Verdict = tuple[str, str]


def envelope_problem(payload: Any) -> str | None:
    """What makes a decoded stored payload unusable as a kombu message, or None."""
    if not isinstance(payload, Mapping):
        return f"the stored message is a {type(payload).__name__}, not a mapping"
    props = payload.get("properties")
    if not isinstance(props, Mapping):
        return f"its properties are a {type(props).__name__}, not a mapping"
    headers = payload.get("headers")
    if headers is not None and not isinstance(headers, Mapping):
        return f"its headers are a {type(headers).__name__}, not a mapping"
    info = props.get("delivery_info")
    if info is not None and not isinstance(info, Mapping):
        return f"its delivery_info is a {type(info).__name__}, not a mapping"
    return None


def task_problem(payload: Mapping[str, Any], body: Any, accept: Collection[str] | None) -> Verdict | None:
    """Why a Celery worker could not run this task message (its body already base64-decoded), or None."""
    content_type = payload.get("content-type")
    encoding = payload.get("content-encoding")
    try:
        decoded = loads(body, content_type, encoding, accept=accept)
    except ContentDisallowed:
        return (RefusedContentError.__name__,
                f"its content type {content_type!r} is not in the worker's accept_content "
                f"({', '.join(sorted(accept or ()))}); the worker refuses to decode it")
    except Exception as exc:
        return (UndecodableMessageError.__name__,
                f"its body does not decode as {content_type!r} ({exc.__class__.__name__}: {exc})")
    headers = payload.get("headers") or {}
    if "task" in headers:   # Celery's protocol 2: the body is [args, kwargs, embed]
        if not isinstance(headers.get("id"), str):
            return MalformedMessageError.__name__, "its headers name a task but carry no task id"
        if not (isinstance(decoded, Sequence) and not isinstance(decoded, (str, bytes)) and len(decoded) == 3
                and isinstance(decoded[0], Sequence) and not isinstance(decoded[0], (str, bytes))
                and isinstance(decoded[1], Mapping) and (decoded[2] is None or isinstance(decoded[2], Mapping))):
            return (MalformedMessageError.__name__,
                    f"its body is not a Celery task body [args, kwargs, embed] (got {_shape(decoded)})")
        return None
    if not (isinstance(decoded, Mapping) and "task" in decoded and "id" in decoded):   # protocol 1
        return (MalformedMessageError.__name__,
                f"it is not a Celery task message: no 'task' header, and its body is {_shape(decoded)}")
    return None


def _shape(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"
