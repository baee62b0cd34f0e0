"""Registers the ``sqlq`` transport with kombu in every process, with no import in the app.

Why this module exists: kombu has no entry-point group for transports, so a
producer whose app module forgot ``import celery_sqlbackend`` failed with
"No such transport: sqlq".  kombu *does* load the ``kombu.serializers``
entry points whenever ``kombu.serialization`` is imported (every Celery and
kombu process does).  This distribution declares one, pointing here: loading
it adds the transport alias (kombu's own ``TRANSPORT_ALIASES``; nothing else
of celery_sqlbackend is imported), and gives kombu the registration it asks
for: a content type name with no encoder or decoder, which selects nothing.

A top-level module, not part of the package: importing ``celery_sqlbackend``
here would import Celery and SQLAlchemy while kombu is still importing.
Whatever goes wrong is swallowed: a failure here must never break kombu.
"""
from __future__ import annotations

#: What kombu's loader registers: (encoder, decoder, content type, content encoding): nothing usable.
SERIALIZER = (None, None, "application/x-sqlq-transport-alias", "binary")

try:
    from kombu.transport import TRANSPORT_ALIASES
    TRANSPORT_ALIASES.setdefault("sqlq", "celery_sqlbackend.transport:Transport")
except Exception:  # pragma: no cover  (never let a broken install break every kombu import)
    pass
