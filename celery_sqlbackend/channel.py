"""The kombu Channel of the SQL transport (and its QoS): publish, batch claim, ack/reject/restore.

:mod:`celery_sqlbackend.transport` holds the Transport that creates it, and the overview.
"""
from __future__ import annotations

import json
import time
import logging
from queue import Empty
from time import monotonic

from kombu.transport import virtual
from kombu.transport.base import to_rabbitmq_queue_arguments
from kombu.utils.objects import cached_property
from sqlalchemy import exc as sa_exc

from . import fanout, maintenance, poison, publishing, stopping_pool, unique
from .limits import keys as limit_keys, worker as limit_worker
from .errors import MalformedMessageError, RejectedError, UndecodableMessageError
from .messages import for_delivery, to_store
from .options import Options
from .processes import LocalProcess, local_process
from .store import Store, store_for, utcnow
from .store.claim_packet import Look
from .store.claim_resume import ResumePoint
from .store.jobs import NewJob
from .worker_hooks import WorkerHooks

log = logging.getLogger("celery_sqlbackend.transport")

#: Jobs per claim when kombu sets no prefetch limit (``worker_prefetch_multiplier = 0``).
UNLIMITED_BATCH = 10


class QoS(virtual.QoS):
    """Acks and rejects reach the database; delivery bookkeeping stays kombu's."""

    def ack(self, delivery_tag):
        self.channel._on_ack(delivery_tag)
        super().ack(delivery_tag)
        self.channel.wake()

    def reject(self, delivery_tag, requeue=False):
        if requeue:
            self.channel._release(delivery_tag)
        else:
            self.channel._dead_letter(delivery_tag)
        super().ack(delivery_tag)
        self.channel.wake()


class Channel(virtual.Channel):
    QoS = QoS
    supports_fanout = True
    do_restore = True

    def __init__(self, connection, **kwargs):
        #: The queues this channel declared in exchanges whose bindings live in the database (``fanout``).
        self.bindings = fanout.ChannelBindings()
        super().__init__(connection, **kwargs)
        # delivery tag -> job id, for deliveries not yet finished.  Written by
        # the consuming thread, read and popped by ack threads: dict ops are
        # atomic under the GIL, and each tag is only ever handled once.
        # (job id, process id it was claimed under): acks are fenced on that id,
        # not the current one, which changes if the process is pruned while alive.
        self._claims: dict[str, tuple[int, int]] = {}
        self._no_ack_queues: set[str] = set()
        self._last_dispatch = 0.0
        self._last_broadcast_poll = 0.0
        self._full_batch_from: tuple[str, ...] | None = None   # queues whose last claim filled its batch
        #: queues -> where their last claim stopped (``store.claim_resume``; PostgreSQL, one queue).
        self._resume_points: dict[tuple[str, ...], ResumePoint] = {}
        self.store.ensure_schema()

    # ------------------------------------------------------------------ configuration

    @cached_property
    def options(self) -> Options:
        return self.connection.options   # the Transport's (``sqlq_*`` settings included)

    @cached_property
    def store(self) -> Store:
        return store_for(self.connection.client.hostname, self.options)

    @property
    def process(self) -> LocalProcess:
        return local_process(self.store)

    @property
    def worker(self) -> WorkerHooks | None:
        """What the Celery worker around us says (``worker_hooks``); None in a plain kombu consumer."""
        return self.process.worker

    def held_job_ids(self) -> set[int]:
        """The jobs this channel has delivered and not yet seen acked (for ``LocalProcess.reconcile``)."""
        return {job_id for job_id, _ in list(self._claims.values())}

    # ------------------------------------------------------------------ publish

    def _put(self, queue, message, **kwargs):
        """Store a message kombu has built: in its own transaction, the caller's (``enqueue_in``)
        or a batch's (``enqueue_many``, groups): see ``publishing``."""
        stored, now = to_store(message), utcnow()
        job = NewJob(queue=queue, payload=stored.payload, task_name=stored.task_name, task_id=stored.task_id,
                     priority=self._get_message_priority(message), created_at=now, eta=stored.eta,
                     expires_at=stored.expires_at, unique=unique.unique_key(message.get("headers") or {}, now),
                     limits=limit_keys.job_limits(message.get("headers") or {}))
        done = publishing.put(self.store, job)
        if done.holder is not None:
            log.info("task %s not enqueued: unique key %r is held by task %s", job.task_id, job.unique.key,
                     done.holder)
            unique.report_duplicate(job.task_id, done.holder)

    def _put_fanout(self, exchange, message, routing_key, **kwargs):
        for queue in fanout.bound_queues(self.store, exchange):
            self._put(queue, message)

    def _queue_bind(self, exchange, routing_key, pattern, queue):
        fanout.bind(self, exchange, queue, routing_key)

    def _lookup(self, exchange, routing_key, default=None):
        local = super()._lookup(exchange, routing_key, default)
        return fanout.lookup(self, exchange, routing_key, local) if exchange else local

    def prepare_queue_arguments(self, arguments, **kwargs):
        # expires / message_ttl -> x-expires / x-message-ttl, as on Redis and AMQP.
        return to_rabbitmq_queue_arguments(arguments, **kwargs)

    def after_reply_message_received(self, queue):
        # Keep the reply queue bound (it expires when its client is gone), so that
        # the next broadcast of a long-lived client (Flower) cannot race its rebind.
        self._purge(queue)

    def basic_cancel(self, consumer_tag):
        queue = self._tag_to_queue.get(consumer_tag)
        super().basic_cancel(consumer_tag)
        fanout.cancelled(self, queue)

    def queue_delete(self, queue, if_unused=False, if_empty=False, **kwargs):
        super().queue_delete(queue, if_unused=if_unused, if_empty=if_empty, **kwargs)
        fanout.unbind_queue(self.store, queue)

    # ------------------------------------------------------------------ consume

    def basic_consume(self, queue, no_ack, callback, consumer_tag, **kwargs):
        if no_ack:
            self._no_ack_queues.add(queue)
        else:
            self.process.update_queues([queue])
        tag = super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)
        # A claim loop that found nothing to consume waits a whole polling interval (PostgreSQL:
        # until a NOTIFY it has not yet subscribed to); a new consumer starts a round now.
        self.wake()
        return tag

    def _get(self, queue, timeout=None):
        """One message (``basic_get``); consumers go through the claim round (``claim_round``)."""
        messages = self._claim([queue], 1)
        if not messages:
            raise Empty()
        return messages[0][0]

    def _claim_limit(self, undelivered: int = 0, share: int = 2) -> int:
        """How many jobs to claim now: the free prefetch, or 0 to wait for more acks.

        While the pool still has deliveries it has not started, a claim waits
        until 1/``share`` of the prefetch is free: a claim costs about the same
        for one job as for eight, so this cuts the transactions of a busy
        worker without letting its pool run dry.  (Unacked deliveries that are
        already running, with ``acks_late``, are not work in waiting.)  Each
        loop has its share: see ``claim_round.SHARE``.  ``undelivered``: jobs
        claimed but not handed to kombu yet, which its prefetch count cannot know about.
        """
        free = self.qos.can_consume_max_estimate()
        if free is None:            # no prefetch limit (multiplier 0)
            return max(0, UNLIMITED_BATCH - undelivered)
        free -= undelivered
        if free >= max(1, self.qos.prefetch_count // share):
            return free
        if free <= 0 or undelivered:
            return 0
        qos = self.qos
        unacked = set(qos._delivered) - set(qos._dirty)
        worker = self.worker
        if worker is not None:
            unacked -= worker.running_tags()
        return 0 if unacked else free

    def _resume_point(self, queues: list[str]) -> ResumePoint:
        """Where this channel's claims of ``queues`` resume (the store decides where a claim can:
        ``store.claim_resume``)."""
        key = tuple(queues)
        point = self._resume_points.get(key)
        if point is None:
            point = self._resume_points[key] = ResumePoint()
        return point

    def _broadcast_only(self, queues) -> bool:
        return bool(queues) and all(q in self._no_ack_queues for q in queues)

    def _broadcast_poll_due(self) -> bool:
        """Remote control (pidbox) and other broadcast queues are polled once per
        polling interval, not on every loop of a busy worker."""
        now = monotonic()
        if now - self._last_broadcast_poll < self.options.polling_interval:
            return False
        self._last_broadcast_poll = now
        return True

    def _claim(self, queues: list[str], limit: int, look: Look | None = None) -> list[tuple[dict, str]]:
        """Claim up to ``limit`` jobs of ``queues`` (with the acks since the last claim); ``look``: queues
        the claim's transaction looks at afterwards, where it can (``store.claim_packet.Look``)."""
        self._maybe_dispatch_due()
        proc = self.process
        proc.claiming(self)
        store = self.store
        if proc.id is None and self._broadcast_only(queues):
            # A client reading replies or events (``celery inspect``, Flower) is no registered process.
            taken = store.claims.take_unowned(queues=queues, limit=limit)
            return [(payload, job.queue_name) for job in taken
                    if (payload := self._decode(job, None)) is not None]
        process_id = proc.ensure_registered()
        # Stamped before the claim is sent, never after it returns: a freeze between the claim's commit
        # and a later stamp would make a taken-back delivery look fresh (``stale_deliveries``).
        claimed_at = time.time()
        # Jobs blocked on a ``Rate`` are claimed apart, within their keys' rates (``limits.worker``:
        # nothing is sent while no key can be open).
        throttled = [] if self._broadcast_only(queues) else limit_worker.claim_throttled(store, queues, limit,
                                                                                          process_id)
        limit -= len(throttled)
        # Idle polls stay reads (``Dialect.look_before_claim``); only pending acks need a write.
        # (Not worth a look while the last claim filled its batch: more are likely waiting.)
        busy = self._full_batch_from == tuple(queues)
        if limit <= 0 or (store.dialect.look_before_claim and not busy and not store.executions.has_ready(queues)):
            if proc.acks.has_pending_writes:
                proc.acks.flush()
            claimed = throttled
        else:
            # One transaction: the acks since the last loop, then the next batch.
            claimed = proc.acks.flush(claim={"queues": queues, "limit": limit, "process_id": process_id,
                                             "look": look, "resume": self._resume_point(queues)})
            self._full_batch_from = tuple(queues) if len(claimed) >= limit else None
            claimed = throttled + claimed
        messages = []
        finished_no_ack = []
        for job in claimed:
            payload = self._decode(job, process_id, claimed_at)
            if payload is None:
                continue
            tag = payload["properties"]["delivery_tag"]
            if job.queue_name in self._no_ack_queues:
                finished_no_ack.append(job.job_id)
            else:
                self._claims[tag] = (job.job_id, process_id)
                limit_worker.delivered(store, job.job_id, payload)
            messages.append((payload, job.queue_name))
        if finished_no_ack:   # broadcasts: delivered is done; one transaction for all
            self.store.claims.finish_many(claims=[(job_id, process_id) for job_id in finished_no_ack],
                                          now=utcnow(), keep=False)
        return messages

    def _decode(self, job, process_id: int | None, claimed_at: float | None = None) -> dict | None:
        """The stored message with a fresh delivery tag, or None (and the job failed) if a worker cannot use it.

        In a Celery worker a task message is checked as Celery will read it (``poison``): what would be
        acked unread or crash the worker is failed here, with the reason, and the rest of the batch goes on.
        """
        try:
            payload = json.loads(job.payload)
            problem = poison.envelope_problem(payload)
            if problem is None:
                props = payload["properties"]
                body = self.decode_body(payload.get("body"), props.get("body_encoding"))
        except Exception as exc:
            self._fail_unusable(job, process_id, UndecodableMessageError.__name__,
                                f"the payload is not a kombu message ({exc.__class__.__name__}: {exc})")
            return None
        if problem is not None:
            self._fail_unusable(job, process_id, MalformedMessageError.__name__, problem)
            return None
        worker = self.worker
        if worker is not None and worker.accept is not None and job.queue_name not in self._no_ack_queues:
            verdict = poison.task_problem(payload, body, worker.accept)
            if verdict is not None:
                self._fail_unusable(job, process_id, *verdict)
                return None
        return for_delivery(payload, job.job_id, job.deliveries, process_id, claimed_at=claimed_at)

    def _fail_unusable(self, job, process_id: int | None, error_class: str, why: str) -> None:
        """File an unusable claimed job as failed (``process_id`` None: taken unclaimed, already gone)."""
        if process_id is None:
            log.error("%s: job %s in queue %r: %s; it was dropped", error_class, job.job_id, job.queue_name, why)
            return
        reason = (f"{error_class}: job {job.job_id} in queue {job.queue_name!r}: {why}; "
                  "it was moved to failed and the worker went on")
        log.error("%s", reason)
        if self.store.claims.fail(job_id=job.job_id, process_id=process_id,
                                  error_class=error_class, error=reason, now=utcnow()):
            self.process.record_failed([job.job_id])   # its Celery result becomes FAILURE

    def _maybe_dispatch_due(self) -> None:
        now = monotonic()
        if now - self._last_dispatch >= self.options.dispatch_interval:
            self._last_dispatch = now
            maintenance.promote_due(self.store)

    # ------------------------------------------------------------------ ack / reject / restore

    def _take_claim(self, tag: str):
        """The claim delivered under ``tag``: this channel's, or one a closed channel handed over."""
        claim = self._claims.pop(tag, None)
        if claim is None:
            claim = self.process.acks.take_adopted(tag)
        return claim

    def _on_ack(self, tag: str) -> None:
        claim = self._take_claim(tag)
        if claim is None:
            return
        job_id, process_id = claim
        worker, acks = self.worker, self.process.acks
        if worker is not None and tag in worker.running_tags():
            # Celery's default early ack: the task is starting, not done.
            acks.started(tag, job_id, process_id)
        elif worker is not None:
            # A worker's main loop records finishes in batches (with its next claim).
            acks.finish_later(job_id, process_id)
        else:
            acks.finish(job_id, process_id)

    def wake(self) -> None:
        """A prefetch slot came free: let a waiting drain_events claim again at once."""
        transport = getattr(self, "_transport_ref", None)
        if transport is not None:
            transport._wake.set()
            feed = transport._feed
            if feed is not None:
                feed.kick()

    def finish_completed(self) -> None:
        """Queue finishes for early-acked jobs whose task is no longer running."""
        worker = self.worker
        if worker is not None and worker.terminating():
            return
        self.process.acks.finish_completed(worker.running_tags() if worker is not None else set())

    def _release(self, tag: str) -> None:
        claim = self._take_claim(tag)
        if claim is None:
            return
        job_id, process_id = claim
        try:
            if not self.store.claims.release(job_id=job_id, process_id=process_id, now=utcnow()):
                log.warning("could not release job %s: this process no longer holds it", job_id)
        except sa_exc.SQLAlchemyError as exc:
            log.warning("release of job %s failed (%s); retrying from the maintenance thread", job_id, exc)
            self.process.acks.defer_release(job_id, process_id)

    def _dead_letter(self, tag: str) -> None:
        claim = self._take_claim(tag)
        if claim is None:
            return
        if self.process.acks.dead_letter(*claim, RejectedError.__name__,
                                         f"{RejectedError.__name__}: the consumer rejected the message without "
                                         "requeue (unregistered task, or Reject(requeue=False))"):
            self.process.record_failed([claim[0]])

    def _restore(self, message):
        """An unacked delivery of a closing channel, in a worker: the claim stays with the process
        (``adopt``) while it lives; a later ack records it, deregistration settles the rest.  (Outside
        a worker, in a plain kombu consumer, the delivery is released at once.)

        * The worker is not stopping: the connection was lost.  Celery may run
          what it had prefetched, even *without* ever acking it (``AsynPool.flush``
          drops the ack of a job already written to a pool process, counting on a
          redelivery): so the claim is marked started (``may_have_run``), and is failed, never re-run.
        * The worker is stopping: Celery closes the channel before its pool has
          drained, so a job a pool process has already started, whose
          "accepted" the worker has not read yet, still looks unacked here
          (and Celery may drop that ack: the pool process finishes the job
          itself, ``stopping_pool``).
        """
        if self.process.managed:
            stopping = self.worker.stopping()
            if stopping:   # (``celery control shutdown`` sends no ``worker_shutting_down``)
                stopping_pool.mark_stopping()
            claim = self._claims.pop(message.delivery_tag, None)
            if claim is not None:
                self.process.acks.adopt(message.delivery_tag, claim, may_have_run=not stopping)
            return
        self._release(message.delivery_tag)

    def _restore_at_beginning(self, message):
        self._release(message.delivery_tag)

    # ------------------------------------------------------------------ queues

    def _purge(self, queue):
        return self.store.queues.purge(queue)

    def _size(self, queue):
        return self.store.executions.ready_count(queue)

    def _new_queue(self, queue, **kwargs):
        fanout.declared(self, queue, kwargs)

    def _has_queue(self, queue, **kwargs):
        return True

    def _delete(self, queue, *args, **kwargs):
        self._purge(queue)

    def close(self):
        if not self.closed:
            transport = getattr(self, "_transport_ref", None)
            if transport is not None:
                transport.release_held(self)
            feed = getattr(transport, "_feed", None)
            if feed is not None:
                feed.release_pending(self)
            self.finish_completed()
        super().close()
        proc = local_process(self.store)
        if not proc.managed and proc.id is not None and not self.connection_has_consumers():
            proc.stop()
            proc.deregister()

    def connection_has_consumers(self) -> bool:
        transport = getattr(self, "_transport_ref", None)
        return bool(transport and any(ch._consumers for ch in transport.channels if ch is not self))
