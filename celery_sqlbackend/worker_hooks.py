"""What a Celery worker tells the transport, in one object.

Why: kombu's channel cannot see the Celery worker around it, yet three of its
decisions depend on it: an early ack means "started" only while the task is
running; a worker shutting down claims nothing new; in a cold shutdown a task
that stops running was killed, not finished.  The worker integration
(:mod:`celery_sqlbackend.lifecycle`) builds one ``WorkerHooks`` and attaches it
to the process (``LocalProcess.attach_worker``), where every channel of that
process finds it (``Channel.worker``).  With no Celery worker around (a plain
kombu consumer) there is none: an ack means "done", an unacked delivery is
waiting, and nothing is ever "stopping".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection


@dataclass(frozen=True)
class WorkerHooks:
    #: The delivery tags of the tasks executing now.
    running_tags: Callable[[], set[str]]
    #: True once the worker is shutting down (as opposed to reconnecting after a lost connection).
    stopping: Callable[[], bool]
    #: True in a cold shutdown, where running tasks are killed: a started job
    #: that stops running then has not finished, and is left for deregistration to fail.
    terminating: Callable[[], bool]
    #: The content types the worker accepts (Celery's ``accept_content``).  Claimed task messages are
    #: checked against it and against Celery's task message shape (``poison``); None: not checked.
    accept: Collection[str] | None = None
