"""Exception types, named after their cause.

The classes below ``SQLQError`` that describe why a job failed are also what
a failed execution row records: ``error_class`` is the class's ``__name__``
(``celery sqlq failed list --error-class ProcessPrunedError``).  They are
rarely raised; they name the cause in one place.
"""
from __future__ import annotations


class SQLQError(Exception):
    """Base class for celery_sqlbackend errors."""


class ConfigurationError(SQLQError, ValueError):
    """A URL or option is wrong; the message says what to write instead."""


class SchemaMissingError(SQLQError):
    """The tables do not exist and this engine does not create them on its own."""


# --------------------------------------------------------------------------- recorded on failed jobs

class ProcessPrunedError(SQLQError):
    """The worker holding a started job stopped heartbeating and was pruned."""


class ProcessMissingError(SQLQError):
    """A job was claimed by a process that is no longer in the registry (found by the sweep)."""


class WorkerShutdownError(SQLQError):
    """The worker shut down (cold) while the job was running."""


class MaxReleasesExceeded(SQLQError):
    """The job went back to the queue ``max_releases`` times after its worker died; it is failed instead."""


class RejectedError(SQLQError):
    """The consumer rejected the message without requeue."""


class UndecodableMessageError(SQLQError):
    """A stored payload could not be decoded into a kombu message."""


class MalformedMessageError(SQLQError):
    """A claimed message is not something a Celery worker can turn into a task (wrong shape, headers or
    delivery_info not mappings)."""


class RefusedContentError(SQLQError):
    """A claimed message's content type is not in the worker's ``accept_content``."""


class WorkerCrashedError(SQLQError):
    """The worker exited with an unrecoverable error while holding the job (counts toward ``max_releases``)."""


#: The classes above: the store's own decisions (as opposed to a task's exception kept by
#: ``record_task_failures``).  A failed row naming one gets that exception as its Celery result.
STORE_DECISIONS: dict[str, type[SQLQError]] = {cls.__name__: cls for cls in (
    ProcessPrunedError, ProcessMissingError, WorkerShutdownError, MaxReleasesExceeded, RejectedError,
    UndecodableMessageError, MalformedMessageError, RefusedContentError,
    WorkerCrashedError)}
