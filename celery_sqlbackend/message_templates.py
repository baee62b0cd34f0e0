"""Runs of like tasks (a group, ``enqueue_many``) built from Celery's own message for the first.

Why: Celery publishes a group one task at a time, and for each it clones and
freezes the signature, routes it, builds the message (headers, ``saferepr`` of
the arguments, serialisation) and runs it through kombu's producer: about
250 µs a task here, more than ten times what storing the row costs.  The
tasks of a typical group (``group(resize.s(i) for i in ids)``) differ only in
their arguments and ids, so the work is the same thousands of times over.  So
do the signatures given to ``enqueue_many``, run after run (``Runs``).

How: the first task goes through Celery's own path, unchanged, and the message
it produced (``publishing.observe``) becomes the template.  Every other task's
message is that template with its own task id (wherever the template has the
first task's id: ``id``, ``root_id``, ``correlation_id``), its ``group_index`` (in a group),
its ``argsrepr``/``kwargsrepr`` (Celery's ``saferepr``, Celery's size limits)
and its body (kombu's JSON of ``(args, kwargs, embed)``, base64 as kombu's
virtual transport stores it).  Before relying on that, the builder rebuilds
the first task's message from its arguments and compares it with Celery's,
key by key: any difference (a serializer, a header a signal handler added)
sends the rest through Celery's path too.

When (``plan``, ``Runs``): only where the template is provably the same for every task.
Plain signatures of one registered task with equal options; no partial
arguments from ``apply_async``; no chord, ETA, countdown, expiry, explicit task
ids or custom ``argsrepr``; no ``before/after_task_publish`` receivers and no
``task-sent`` events (they run once per message); Celery's own ``apply_async``,
``shadow_name`` and static routes (a routing function may look at the
arguments); no unique key or limit (their keys come from the arguments).
Anything else is Celery's path, exactly as before.  Argument checking
(``task.typing``) still runs for every task, and every ``AsyncResult`` joins the
group's barrier as in ``group._apply_tasks`` (outside a group: is marked
``ignored`` and joins the calling task's trail as ``send_task`` does).
"""
from __future__ import annotations

import base64
import contextlib
import gc
import json
import os
import re
from typing import Any, Iterator

from celery import signals
from celery.backends.base import Backend as BaseBackend
from celery.app.routes import MapRoute
from celery.app.task import Task
from celery.canvas import Signature
from celery.utils.saferepr import saferepr
from kombu.utils.json import JSONEncoder as KombuJSONEncoder
from kombu.utils.uuid import uuid
from vine import barrier

from . import publishing
from .plain_repr import plain_repr
from .store import utcnow
from .store.jobs import NewJob

#: kombu's JSON serializer (``kombu.utils.json.dumps``) without making an encoder per message.
_BODY_ENCODER = KombuJSONEncoder()
#: The values of a message that differ from task to task (``Template``).
_SLOTS = ("id", "index", "argsrepr", "kwargsrepr", "tag", "body")
#: Per-task options that make messages differ in ways the template cannot follow.
_PER_TASK = frozenset({"task_id", "chord", "countdown", "eta", "expires", "argsrepr", "kwargsrepr", "shadow",
                       "group_index"})


def apply(group_sig: Any, args: Any, kwargs: Any, add_to_parent: bool, producer: Any,
          options: dict[str, Any]) -> Any:
    """``group.apply_async`` for a group ``plan`` accepts, else None (nothing done: Celery's path)."""
    freeze_gid = getattr(group_sig, "_freeze_gid", None)
    if freeze_gid is None or args or kwargs:
        return None
    app = group_sig.app
    options, group_id, root_id = freeze_gid(options)
    with _collector_paused():
        return _apply_planned(group_sig, app, add_to_parent, producer, options, group_id, root_id)


def _apply_planned(group_sig: Any, app: Any, add_to_parent: bool, producer: Any, options: dict[str, Any],
                   group_id: str, root_id: str | None) -> Any:
    planned = plan(group_sig, options)
    if planned is None:
        return None
    task, sigs = planned
    ready = barrier()
    with app.producer_or_acquire(producer) as producer:
        with publishing.observe() as observed:
            results = list(group_sig._apply_tasks(_frozen(sigs[:1], 0, group_id, root_id), producer, app, ready,
                                                  **options))
        template = Template.of(observed, task, sigs[0])
        if template is not None:
            results.extend(publish_rest(template, sigs, ready))
        else:   # (Celery's path for the rest, as ``group._apply_tasks`` would have taken it)
            results.extend(group_sig._apply_tasks(_frozen(sigs[1:], 1, group_id, root_id), producer, app, ready,
                                                  **options))
    result = app.GroupResult(group_id, results, ready_barrier=ready)
    ready.finalize()
    parent_task = app.current_worker_task
    if add_to_parent and parent_task:
        parent_task.add_trail(result)
    return result


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while a group's signatures are read and its messages made.

    Why: each task allocates a few objects (its signature, its result and its promise
    among them) that live as long as the group's result, so the collector's passes find
    nothing to free and walk ever more live objects: 40% of the time of a
    10,000-task group.  Whatever it would have freed is freed at its next pass
    after this.  (Left as it was if it was off already, and on again whatever happens.)
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def plan(group_sig: Any, options: dict[str, Any]) -> tuple[Any, list[Signature]] | None:
    """The task and the signatures of a group whose messages can come from one template, or None
    (``options``: the group's, merged as ``group._freeze_gid`` does)."""
    if _PER_TASK & options.keys() or not _app_allows(group_sig.app):
        return None
    sigs = list(group_sig.tasks)
    if len(sigs) < 2:
        return None
    task = _templatable_task(group_sig.app, sigs[0])
    if task is None or not all(_alike(sig, sigs[0]) for sig in sigs):
        return None
    return task, sigs


def _app_allows(app: Any) -> bool:
    """Nothing in the app acts on each message on its own (module doc)."""
    conf = app.conf
    return not (conf.task_always_eager or conf.task_send_sent_event or conf.task_protocol != 2
                or signals.before_task_publish.receivers or signals.after_task_publish.receivers
                or type(app.backend).on_task_call is not BaseBackend.on_task_call
                or not all(isinstance(route, MapRoute) for route in app.amqp.router.routes))


def _templatable_task(app: Any, sig: Any) -> Any:
    """The registered task of a plain signature whose message a template can follow, or None."""
    if type(sig) is not Signature or sig.get("subtask_type") or sig.options.keys() & _PER_TASK:
        return None
    task = app.tasks.get(sig.task)
    if task is None or type(task).shadow_name is not Task.shadow_name or type(task).apply_async is not Task.apply_async:
        return None
    return task


def _alike(sig: Any, first: Signature) -> bool:
    return (type(sig) is Signature and sig.task == first.task and sig.options == first.options
            and not sig.get("subtask_type"))


class Runs:
    """``enqueue_many``'s signatures, each run of like ones built from Celery's message for its first."""

    def __init__(self) -> None:
        self._template: Template | None = None
        self._first: Signature | None = None

    def apply(self, sig: Any, producer: Any) -> Any:
        """``sig.apply_async(producer=producer)``, from the current template when ``sig`` is alike."""
        template, first = self._template, self._first
        if template is not None and first is not None and sig.app is first.app and _alike(sig, first):
            return template.publish_one(sig)
        self._template = self._first = None
        task = _templatable_task(sig.app, sig) if _app_allows(sig.app) else None
        if task is None:
            return sig.apply_async(producer=producer)
        with publishing.observe() as observed:
            result = sig.apply_async(producer=producer)
        self._template = Template.of(observed, task, sig, ignored=getattr(result, "ignored", None))
        self._first = sig
        return result


def _frozen(sigs: list[Signature], start: int, group_id: str, root_id: str | None) -> Iterator[tuple]:
    """What ``group._prepared`` yields for plain signatures (no partial arguments), from ``start``."""
    for index, sig in enumerate(sigs, start=start):
        sig = sig.clone()
        yield sig, sig.freeze(group_id=group_id, root_id=root_id, group_index=index), group_id


class Template:
    """Celery's message for a group's first task, and how to make the others' from it.

    The message is kept as JSON text cut at the values that change (``_SLOTS``):
    a task's payload is the pieces joined with its own values, so the parts that
    never change are never encoded again.
    """

    def __init__(self, store: Any, job: NewJob, message: dict[str, Any], task: Any, ignored: Any = None) -> None:
        self.store, self.job, self.task, self.ignored = store, job, task, ignored
        #: Celery's check of a call's arguments against the task's signature (``Task.typing``).
        self.check = getattr(task, "__header__", None) if task.typing else None
        headers, properties = message["headers"], message["properties"]
        first_id = headers["id"]
        _args, _kwargs, self.embed = json.loads(base64.b64decode(message["body"]))
        amqp = task.app.amqp
        self.args_max, self.kwargs_max = amqp.argsrepr_maxsize, amqp.kwargsrepr_maxsize
        # (Celery 5.7 passes ``task_repr_maxlevels``; 5.5 has no such setting and uses the default)
        levels = task.app.conf.get("task_repr_maxlevels")
        self.repr_options = {} if levels is None else {"maxlevels": levels}
        # The message with a marker in each slot: every value equal to the first task's id
        # (``id``, ``root_id``, ``correlation_id``), the group index, the reprs, the tag, the body.
        mark = f"sqlq-{uuid()}-"
        slotted_headers = {k: mark + "id" if v == first_id else v for k, v in headers.items()}
        slotted_headers.update(argsrepr=mark + "argsrepr", kwargsrepr=mark + "kwargsrepr")
        if headers.get("group_index") is not None:    # (in a group)
            slotted_headers["group_index"] = mark + "index"
        slotted_properties = {k: mark + "id" if v == first_id else v for k, v in properties.items()}
        slotted_properties["delivery_tag"] = mark + "tag"
        slotted = {**message, "body": mark + "body", "headers": slotted_headers, "properties": slotted_properties}
        cut = re.split('"' + re.escape(mark) + "(" + "|".join(_SLOTS) + ')"', json.dumps(slotted))
        self.pieces = cut    # text, slot, text, slot, …, text
        self.slots = [(i, cut[i]) for i in range(1, len(cut), 2)]
        if len(cut) < 2 or any(mark in piece for piece in cut[::2]):
            raise ValueError("the template's markers are not where they were put")

    @classmethod
    def of(cls, observed: list[tuple[Any, NewJob]], task: Any, sig: Signature, ignored: Any = None
           ) -> "Template | None":
        """The template, if the one message observed is one it reproduces exactly."""
        if len(observed) != 1:
            return None
        store, job = observed[0]
        if job.unique is not None or job.limits is not None or job.eta is not None or job.expires_at is not None:
            return None
        message = json.loads(job.payload)
        headers, properties = message.get("headers") or {}, message.get("properties") or {}
        if (message.get("content-type") != "application/json" or message.get("content-encoding") != "utf-8"
                or properties.get("body_encoding") != "base64" or "compression" in headers
                or headers.get("eta") is not None or headers.get("expires") is not None
                or headers.get("group_index") not in (0, None) or not isinstance(headers.get("id"), str)):
            return None
        try:
            template = cls(store, job, message, task, ignored)
        except ValueError:
            return None
        again = template.payload(headers["id"], 0, sig.args or (), sig.kwargs or {}, properties["delivery_tag"])
        return template if json.loads(again) == message else None

    def payload(self, task_id: str, index: int, args: Any, kwargs: Any, tag: str) -> str:
        """The stored message of the task ``task_id``, ``index``-th of the group."""
        body = base64.b64encode(_BODY_ENCODER.encode((args, kwargs, self.embed)).encode("utf-8")).decode("ascii")
        argsrepr = plain_repr(args, self.args_max) or saferepr(args, self.args_max, **self.repr_options)
        kwargsrepr = plain_repr(kwargs, self.kwargs_max) or saferepr(kwargs, self.kwargs_max, **self.repr_options)
        values = {"id": '"' + task_id + '"', "index": str(index), "argsrepr": json.dumps(argsrepr),
                  "kwargsrepr": json.dumps(kwargsrepr), "tag": json.dumps(tag), "body": '"' + body + '"'}
        pieces = list(self.pieces)
        for at, slot in self.slots:
            pieces[at] = values[slot]
        return "".join(pieces)

    def store_task(self, sig: Signature, index: int, task_id: str, tag: str) -> Any:
        """Check ``sig``'s arguments as Celery does, store its message; its ``AsyncResult``."""
        args, kwargs = sig.args or (), sig.kwargs or {}    # (as ``as_task_v2``)
        if self.check is not None:
            self.check(*args, **kwargs)
        publishing.put(self.store, self.new_job(task_id, self.payload(task_id, index, args, kwargs, tag)))
        return self.task.AsyncResult(task_id)

    def publish_one(self, sig: Signature) -> Any:
        """Store ``sig``'s message (not in a group) and return its result, as ``apply_async`` does."""
        result = self.store_task(sig, 0, *_uuid4s(2))
        result.ignored = self.ignored
        parent = self.task.app.current_worker_task
        if parent:
            parent.add_trail(result)
        return result

    def new_job(self, task_id: str, payload: str) -> NewJob:
        first = self.job
        return NewJob(queue=first.queue, payload=payload, task_name=first.task_name, task_id=task_id,
                      priority=first.priority, created_at=utcnow())


def publish_rest(template: Template, sigs: list[Signature], barrier: Any) -> Iterator[Any]:
    """Store the messages of ``sigs[1:]`` from ``template``; yields their results, as ``_apply_tasks``."""
    for start in range(1, len(sigs), _IDS_AT_ONCE):
        fresh = iter(_uuid4s(2 * _IDS_AT_ONCE))
        for index, sig in enumerate(sigs[start:start + _IDS_AT_ONCE], start=start):
            result = template.store_task(sig, index, next(fresh), next(fresh))
            if barrier and not barrier.cancelled and not barrier.ready:
                barrier.size += 1
                result.then(barrier, weak=True)
            yield result


#: Task ids and delivery tags are made this many tasks at a time (``_uuid4s``).
_IDS_AT_ONCE = 256


def _uuid4s(count: int) -> list[str]:
    """``count`` random UUIDs (version 4) as text, like kombu's ``uuid()``, from one ``os.urandom`` call
    (a fifth of the cost of ``str(uuid.uuid4())`` each)."""
    raw = os.urandom(16 * count).hex()
    out = []
    for at in range(0, 32 * count, 32):
        h = raw[at:at + 32]
        out.append(f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}")
    return out


_VARIANT = "89ab"    # (RFC 4122: the two high bits of byte 8 are 10)
