"""Exception types, named after their cause."""
from __future__ import annotations


class SQLQError(Exception):
    """Base class for celery_sqlbackend errors."""


class ConfigurationError(SQLQError, ValueError):
    """A URL or option is wrong; the message says what to write instead."""


class SchemaMissingError(SQLQError):
    """The tables do not exist and this engine does not create them on its own."""


class ProcessPrunedError(SQLQError):
    """The worker holding a started job stopped heartbeating and was pruned."""


class ClaimLostError(SQLQError):
    """This process tried to change a job it no longer holds (it was pruned)."""


class UndecodableMessageError(SQLQError):
    """A stored payload could not be decoded into a kombu message."""
