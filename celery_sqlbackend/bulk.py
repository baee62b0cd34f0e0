"""Many jobs at once: ``enqueue_many``, and groups and chords batched on this transport.

Both run Celery's own publishing (``Signature.apply_async``: message building,
routing, result bookkeeping) inside a ``publishing.batch()``, so that the
channel buffers what it would have written one transaction per message and
writes it in multi-row INSERTs in one transaction at the end.

Groups: Celery publishes a group's tasks in ``group.apply_async`` (through
``group._apply_tasks``, one ``apply_async`` per task; a chord's header is such
a group, applied by ``chord.run``), identically in Celery 5.5 and 5.7.
``install`` wraps ``group.apply_async`` in a batch: the ``GroupResult`` is
returned once every task is stored.  A batch costs nothing to a transport
that never looks at it (Redis, AMQP), and joins an enclosing batch
(a group inside a group, or inside ``enqueue_many``) or ``enqueue_in`` block.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from . import message_templates
from .publishing import batch


def enqueue_many(signatures: Iterable[Any], *, app: Any = None) -> list[Any]:
    """Apply every signature (``task.s(...)``), all in one transaction; returns their ``AsyncResult``s.

    ``signatures`` may be a generator: only a chunk of messages is held at a
    time (``publishing.CHUNK_ROWS``), however many there are.  A run of like
    signatures (one task, the same options) is built from Celery's message for
    its first (``message_templates.Runs``).  Inside
    ``enqueue_in`` the transaction is the caller's.  A unique task whose key is
    held gets the holder's ``AsyncResult``, as with ``delay``.
    """
    results: list[Any] = []
    runs = message_templates.Runs()
    with batch():
        producers: dict[int, Any] = {}
        try:
            for sig in signatures:
                owner = app or sig.app
                producer = producers.get(id(owner))
                if producer is None:
                    producer = producers[id(owner)] = owner.producer_pool.acquire(block=True)
                results.append(runs.apply(sig, producer))
        finally:
            for producer in producers.values():
                producer.release()
    return results


def _wrap(apply_async: Callable[..., Any]) -> Callable[..., Any]:
    def apply_async_batched(self, args=None, kwargs=None, add_to_parent=True, producer=None, link=None,
                            link_error=None, **options: Any):
        with batch():
            if link is None and link_error is None and not self.app.conf.task_always_eager:
                result = message_templates.apply(self, args, kwargs, add_to_parent, producer, options)
                if result is not None:
                    return result
            return apply_async(self, args, kwargs, add_to_parent=add_to_parent, producer=producer, link=link,
                               link_error=link_error, **options)

    apply_async_batched._sqlq_original = apply_async   # type: ignore[attr-defined]
    apply_async_batched.__doc__ = apply_async.__doc__
    return apply_async_batched


def install() -> None:
    """Wrap ``celery.canvas.group.apply_async`` once (``import celery_sqlbackend`` calls it)."""
    from celery.canvas import group
    if not hasattr(group.apply_async, "_sqlq_original"):
        group.apply_async = _wrap(group.apply_async)
