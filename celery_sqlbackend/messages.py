"""A kombu message as the store keeps it, and as a delivery hands it back.

Why apart from the channel: what a message *means* to the store (when it is
due, when it expires) and what a redelivery must change in it (a fresh
delivery tag, the ``redelivered`` flag) are rules about the message, true
whichever loop claims it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping, NamedTuple

from kombu.utils.uuid import uuid

from . import fanout


def utc_naive(value: str | None) -> datetime | None:
    """An ISO timestamp from a Celery header as naive UTC (the store's time), or None if absent or unreadable."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(timezone.utc).replace(tzinfo=None)
    return parsed


@dataclass(frozen=True)
class Stored:
    """The columns a published message fills besides its queue and priority."""
    payload: str
    task_name: str | None
    task_id: str | None
    eta: datetime | None           # Celery's ETA/countdown: stored as a scheduled execution
    expires_at: datetime | None    # Celery's ``expires``, else the AMQP ``expiration`` property


def to_store(message: dict[str, Any]) -> Stored:
    headers = message.get("headers") or {}
    return Stored(
        payload=json.dumps(message), task_name=headers.get("task"), task_id=headers.get("id"),
        eta=utc_naive(headers.get("eta")),
        expires_at=utc_naive(headers.get("expires")) or fanout.expiry_of(message))


class DeliveredClaim(NamedTuple):
    """The claim a delivery was made under, as ``for_delivery`` marked it."""
    job_id: int
    process_id: int
    claimed_at: float | None    # (wall clock, epoch seconds; None in a message from an older version)


def delivered_claim(properties: Mapping[str, Any] | None) -> DeliveredClaim | None:
    """The claim behind a delivered message, from its properties (a task request's
    ``properties``), or None: not delivered by this broker, or run eagerly."""
    info = (properties or {}).get("delivery_info") or {}
    job_id, process_id = info.get("sqlq_job_id"), info.get("sqlq_process_id")
    if job_id is None or process_id is None:
        return None
    return DeliveredClaim(job_id, process_id, info.get("sqlq_claimed_at"))


def for_delivery(payload: dict[str, Any], job_id: int, deliveries: int,
                 process_id: int | None = None, claimed_at: float | None = None) -> dict[str, Any]:
    """Mark a decoded stored message for this delivery (in place; returns it).

    Every delivery gets its own tag: the stored one was minted at publish and
    would repeat on redelivery.  The job and the process id it was claimed under
    travel with it, so that the task's own process can record its final failure
    fenced on that claim (``task_failures``).
    """
    props = payload["properties"]
    props["delivery_tag"] = uuid()
    info = props.setdefault("delivery_info", {})
    info["sqlq_job_id"] = job_id
    info["sqlq_process_id"] = process_id
    if claimed_at is not None:
        info["sqlq_claimed_at"] = claimed_at     # (wall clock: see ``stale_deliveries``)
    info["redelivered"] = deliveries > 1
    payload["redelivered"] = deliveries > 1
    return payload
