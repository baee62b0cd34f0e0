"""Celery result backend that keeps results, groups and chords in the SQL store.

Configuration
=============
``result_backend`` takes the same SQLAlchemy URL as the broker, after ``sqlq+``::

    result_backend = "sqlq+sqlite:///jobs.sqlite3"
    result_backend = "sqlq+postgresql+psycopg://user:password@db/app"
    result_backend = "sqlq://"          # the database of the (sqlq) broker

Celery finds the class through the ``celery.result_backends`` entry point, so
no import is needed beyond the one the transport asks for.  Options
(``table_prefix``, ``create_tables``, ``polling_interval``, ...; see
:mod:`celery_sqlbackend.options`) come from ``broker_transport_options`` when
the results live in the broker's database, overlaid by
``result_backend_transport_options``.

What it does
============
* Results are encoded with ``result_serializer`` (JSON by default) and decoded
  with the content type they were written with, under ``result_accept_content``
  / ``accept_content``: pickle is refused unless the user allows it.
* A result the serializer cannot encode becomes a FAILURE that says why
  (Celery's tracer turns the ``EncodeError`` raised here into the failure).
* ``get()``/``join()`` wait without hammering the database: PostgreSQL
  waiters LISTEN on ``<prefix>results`` (notified from the storing
  transaction) and fetch only what was announced, polling at ``interval`` as
  the fallback; other databases poll with a short backing-off interval.
  Groups are fetched with one ``IN (...)`` query per round.
* Chords are joined natively by a counter row (``store.results.chord_part_done``);
  no ``celery.chord_unlock`` task is involved.
* A dropped connection is retried with backoff for up to ``reconnect_timeout``
  seconds; ``result_expires`` is applied by :meth:`SQLBackend.cleanup` (run
  daily by ``celery beat``) in small batches.
"""
from __future__ import annotations

import logging
import random
import time
from datetime import timedelta
from time import monotonic
from typing import Any, Callable, ParamSpec, TypeVar

from celery import states
from celery.backends.base import BaseBackend
from celery.exceptions import ChordError, ImproperlyConfigured, TimeoutError
from celery.result import GroupResult, allow_join_result, result_from_tuple
from kombu.exceptions import EncodeError
from kombu.serialization import loads
from kombu.utils.encoding import ensure_bytes

from .notify import result_notifier_for
from .options import Options, from_celery_conf, sqlq_settings
from .result_codec import chord_error, compress, compression_method, decompress
from .store import store_for, utcnow
from .store.dialects import is_disconnect
from .urls import PREFIX, backend_database_url, broker_database_url, mask

log = logging.getLogger("celery_sqlbackend.backend")
P = ParamSpec("P")
T = TypeVar("T")

#: Keys of ``result_backend_transport_options`` that are the backend's own
#: (everything else must be a store option).
_BACKEND_OPTIONS = {"reconnect_timeout", "first_poll_interval"}


def _maybe_signature(sig, app):
    from celery.canvas import maybe_signature
    return maybe_signature(sig, app=app)


class SQLBackend(BaseBackend):
    """Results, groups and chords in the celery_sqlbackend store."""

    supports_native_join = True
    supports_autoexpire = False
    supports_result_compression = True
    persistent = True

    #: Seconds to keep retrying an operation whose connection dropped.
    reconnect_timeout = 30.0
    #: First sleep of the backing-off poll (databases without NOTIFY).
    first_poll_interval = 0.002
    #: Rows deleted per transaction by :meth:`cleanup`.
    cleanup_batch_size = 1000

    def __init__(self, app, url: str | None = None, **kwargs):
        super().__init__(app, url=url, **kwargs)
        self.url = url
        self.db_url = self._database_url(url)
        store_options, own = self._options()
        self.reconnect_timeout = float(own.get("reconnect_timeout", self.reconnect_timeout))
        self.first_poll_interval = float(own.get("first_poll_interval", self.first_poll_interval))
        self.store = store_for(self.db_url, store_options)
        self.cleanup_batch_size = store_options.clear_batch_size
        #: ``result_compression`` (Celery 5.7's setting, honoured on every Celery by ``result_codec``).
        self.result_compression = compression_method(self.app.conf.get("result_compression"))
        if self.content_type not in self.accept:
            raise ImproperlyConfigured(
                f"result_serializer={self.serializer!r} ({self.content_type}) is not in the accepted "
                f"content types {sorted(self.accept)}: results written with it could not be read back. "
                f"Add {self.serializer!r} to result_accept_content (only if you trust everyone who can "
                "write to the results table), or use 'json'")

    # ------------------------------------------------------------------ configuration

    def _database_url(self, url: str | None) -> str:
        return backend_database_url(url, self.app.conf)

    def _options(self) -> tuple[Options, dict]:
        conf = self.app.conf
        given: dict[str, Any] = sqlq_settings(conf)   # ``sqlq_<option>``: every process of the app
        if broker_database_url(conf) == self.db_url:
            given.update(from_celery_conf(conf))
        given.update(conf.result_backend_transport_options or {})
        own = {k: given.pop(k) for k in list(given) if k in _BACKEND_OPTIONS}
        return Options.from_mapping(given), own

    def __reduce__(self, args=(), kwargs=None):
        kwargs = dict(kwargs or {}, url=self.url, expires=self.expires)
        return super().__reduce__(args, kwargs)

    def as_uri(self, include_password=False):
        uri = PREFIX + self.db_url
        return uri if include_password else mask(uri)

    # ------------------------------------------------------------------ database access

    def _db(self, statement: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a ``store.results`` gateway method; a dropped connection is retried with backoff."""
        deadline = monotonic() + self.reconnect_timeout
        delay = 0.05
        while True:
            try:
                return statement(*args, **kwargs)
            except Exception as exc:
                if not is_disconnect(exc) or monotonic() + delay > deadline:
                    raise
                log.warning("result backend lost its database connection (%s: %s); retrying in %.2fs",
                            exc.__class__.__name__, mask(exc), delay)
                self.on_backend_retryable_error(exc)
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 2.0)

    def exception_safe_to_retry(self, exc):
        return is_disconnect(exc)

    def on_backend_retryable_error(self, exc):
        # Drop pooled connections to the server that went away.
        self.store.engine.dispose()

    # ------------------------------------------------------------------ encoding

    def _encode_meta(self, meta: dict) -> bytes:
        _, _, payload = self._encode(meta)
        payload = ensure_bytes(payload)
        return compress(payload, self.result_compression)

    def _decode_row(self, row) -> dict:
        payload = decompress(row.payload)
        meta = loads(payload, content_type=row.content_type, content_encoding=row.content_encoding,
                     accept=self.accept)
        return self.meta_from_decoded(meta)

    def _unencodable(self, task_id: str, state: str, exc: Exception) -> str:
        return (f"the {state} result of task {task_id} cannot be stored: result_serializer="
                f"{self.serializer!r} cannot encode it ({exc.__class__.__name__}: {exc})")

    # ------------------------------------------------------------------ task results

    def _store_result(self, task_id, result, state, traceback=None, request=None, **kwargs):
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = task_id
        try:
            payload = self._encode_meta(meta)
        except Exception as exc:
            reason = self._unencodable(task_id, state, exc)
            if state not in self.EXCEPTION_STATES:
                # Celery's tracer stores this as the task's FAILURE (and runs errbacks).
                raise EncodeError(reason) from exc
            log.error("%s; storing a FAILURE that says so", reason)
            state = states.FAILURE
            meta = dict(meta, status=state, result=self.prepare_exception(EncodeError(reason)),
                        args=None, kwargs=None)
            meta = {k: v for k, v in meta.items() if k in ("status", "result", "traceback", "children",
                                                            "date_done", "task_id", "group_id", "parent_id")}
            meta["children"] = None
            payload = self._encode_meta(meta)
        now = utcnow()
        self._db(
            self.store.results.store_result, task_id=task_id, status=state, content_type=self.content_type,
            content_encoding=self.content_encoding, payload=payload, now=now,
            date_done=now if state in self.READY_STATES else None,
            name=_short(meta.get("name")), worker=_short(meta.get("worker")),
            retries=_attempt(meta, request),
            queue=_short(meta.get("queue")), group_id=_short(meta.get("group_id")),
        )
        return result

    def _get_task_meta_for(self, task_id):
        row = self._db(self.store.results.get, task_id)
        if row is None:
            return {"status": states.PENDING, "result": None}
        return self._decode_row(row)

    def task_result_exists(self, task_id):
        return self._db(self.store.results.exists, task_id)

    def _forget(self, task_id):
        self._db(self.store.results.forget, [task_id])

    def result_for_job(self, job_id: int) -> dict | None:
        """The result meta of the task a stored job carried (None: no such job, or no result yet)."""
        row = self._db(self.store.results.for_job, job_id)
        return None if row is None else self._decode_row(row)

    # ------------------------------------------------------------------ waiting

    def _waiter(self):
        return result_notifier_for(self.store)

    def wait_for(self, task_id, timeout=None, interval=0.5, no_ack=True, on_interval=None):
        """Wait for one result: woken by NOTIFY on PostgreSQL, a backing-off poll elsewhere."""
        for _, meta in self.get_many([task_id], timeout=timeout, interval=interval, on_interval=on_interval,
                                     _raise_message="The operation timed out."):
            if on_interval is not None and meta["status"] in states.PROPAGATE_STATES:
                # Celery's ``on_interval`` raises a failed parent's error (a chord's header before
                # its body's ChordError): look once more, or which one the caller sees would depend
                # on whether both failures landed between the same two polls.
                on_interval()
            return meta
        return self.get_task_meta(task_id)

    def get_many(self, task_ids, timeout=None, interval=0.5, no_ack=True, on_message=None,
                 on_interval=None, max_iterations=None, READY_STATES=states.READY_STATES,
                 _raise_message=None):
        """Yield ``(task_id, meta)`` as results become ready: one query per round."""
        self._ensure_not_eager()
        interval = 0.5 if interval is None else interval
        ids = set(task_ids)
        cache = self._cache
        for task_id in list(ids):
            cached = cache.get(task_id)
            if cached is not None and cached["status"] in READY_STATES:
                ids.discard(task_id)
                yield task_id, cached
        if not ids:
            return
        notifier = self._waiter()
        token = notifier.token() if notifier is not None else None
        deadline = None if timeout is None else monotonic() + timeout
        poll_cap = max(min(interval, self.store.options.polling_interval), self.first_poll_interval)
        nap = self.first_poll_interval
        check: set | None = None   # None: everything still pending
        iterations = 0
        while ids:
            if check is None or check:
                wanted = ids if check is None else check
                rows = self._db(self.store.results.get_many, list(wanted), states=list(READY_STATES))
                found = {}
                for row in rows:
                    found[row.task_id] = self._decode_row(row)
                cache.update(found)
                for task_id, meta in found.items():
                    ids.discard(task_id)
                    if on_message is not None:
                        on_message(meta)
                    yield task_id, meta
                if not ids:
                    return
                if found:
                    nap = self.first_poll_interval
                iterations += 1
                if max_iterations and iterations >= max_iterations:
                    return
            remaining = None if deadline is None else deadline - monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(_raise_message or f"Operation timed out ({timeout})")
            if on_interval:
                on_interval()
            if token is not None:
                # LISTENing: wait for announcements; re-read everything at ``interval`` as a fallback.
                wait = interval if remaining is None else min(interval, remaining)
                token, announced = notifier.wait(token, wait)
                check = None if announced is None else (announced & ids)
                if token is None:
                    token = notifier.token()
            else:
                wait = nap if remaining is None else min(nap, remaining)
                time.sleep(wait)
                nap = min(nap * 1.5, poll_cap)
                check = None
                if notifier is not None:
                    token = notifier.token()

    # ------------------------------------------------------------------ groups

    def _save_group(self, group_id, result):
        payload = self._encode_meta({"result": result.as_tuple()})
        self._db(self.store.results.save_group, group_id=group_id, content_type=self.content_type,
                 content_encoding=self.content_encoding, payload=payload, now=utcnow())
        return result

    def _restore_group(self, group_id):
        row = self._db(self.store.results.get_group, group_id)
        if row is None:
            return None
        meta = loads(decompress(row.payload), content_type=row.content_type,
                     content_encoding=row.content_encoding, accept=self.accept)
        meta["result"] = result_from_tuple(meta["result"], self.app)
        return meta

    def _delete_group(self, group_id):
        self._db(self.store.results.delete_group, group_id)

    # ------------------------------------------------------------------ chords

    def set_chord_size(self, group_id, chord_size):
        self._db(self.store.results.chord_set_size, group_id=group_id, size=chord_size, now=utcnow())

    def apply_chord(self, header_result_args, body, **kwargs):
        """Start a native chord: save the header GroupResult and a fresh counter row."""
        self.ensure_chords_allowed()
        header_result = self.app.GroupResult(*header_result_args)
        header_result.save(backend=self)
        self._db(self.store.results.chord_start, group_id=header_result.id, now=utcnow())
        return header_result

    def on_chord_part_return(self, request, state, result, **kwargs):
        """Count this header part; the part that completes the chord joins and sends the body, once."""
        app = self.app
        gid = getattr(request, "group", None)
        if not gid or not getattr(request, "chord", None):
            return
        try:
            count = self._db(self.store.results.chord_part_done, gid)
        except Exception as exc:
            callback = _maybe_signature(request.chord, app)
            log.exception("Chord %r: counting part %s failed: %r", gid, request.id, exc)
            return self.chord_error_from_stack(callback, ChordError(f"Cannot count chord part: {exc!r}"))
        if count is None:
            callback = _maybe_signature(request.chord, app)
            log.error("Chord %r: no counter (expired, or started by another backend)", gid)
            return self.chord_error_from_stack(callback, ChordError(f"GroupResult {gid} no longer exists"))
        if count.size is not None and count.done > count.size:
            log.warning("Chord counter incremented too many times for %r", gid)
        if not count.fire:
            return
        callback = _maybe_signature(request.chord, app)
        try:
            deps = GroupResult.restore(gid, backend=self)
        except Exception as exc:
            log.exception("Chord %r raised: %r", gid, exc)
            return self.chord_error_from_stack(callback, ChordError(f"Cannot restore group: {exc!r}"))
        if deps is None:
            return self.chord_error_from_stack(callback, ChordError(f"GroupResult {gid} no longer exists"))
        try:
            with allow_join_result():
                ret = deps.join_native(timeout=app.conf.result_chord_join_timeout, propagate=True)
        except Exception as exc:
            culprit = self._first_failed(deps)
            reason = f"Dependency {culprit} raised {exc!r}" if culprit else repr(exc)
            log.exception("Chord %r raised: %r", gid, reason)
            self.chord_error_from_stack(callback, chord_error(reason, exc))
        else:
            try:
                # Celery's publish retry (task_publish_retry_policy) applies, on every Celery.
                callback.delay(ret)
            except Exception as exc:
                log.exception("Chord %r raised: %r", gid, exc)
                self.chord_error_from_stack(callback, chord_error(f"Callback error: {exc!r}", exc))
        finally:
            # The counter row stays (fired) until expiry, so a late duplicate
            # part cannot fire the body again; the saved header goes now.
            try:
                deps.delete(backend=self)
            except Exception:
                log.warning("Chord %r: could not delete the saved header group", gid, exc_info=True)

    def _first_failed(self, deps) -> str | None:
        """The id of the first header result (in header order) that failed, in one query."""
        ids = [r.id for r in deps.results if getattr(r, "id", None)]
        try:
            rows = self._db(self.store.results.get_many, ids, states=list(states.PROPAGATE_STATES))
        except Exception:
            return None
        failed = {row.task_id for row in rows}
        return next((i for i in ids if i in failed), None)

    # ------------------------------------------------------------------ expiry

    def cleanup(self, now=None):
        """Delete results, groups and chord counters older than ``result_expires``, in batches.

        Each batch is its own short transaction, so writers never wait long.
        Returns the number of rows deleted per table.
        """
        counts = {"results": 0, "groups": 0, "chords": 0}
        if not self.expires:
            return counts
        before = (now or utcnow()) - timedelta(seconds=self.expires)
        chord_expires = self.app.conf.get("result_chord_expires") or self.expires
        chord_before = (now or utcnow()) - timedelta(seconds=max(chord_expires, self.expires))
        limit = self.cleanup_batch_size
        results = self.store.results
        for table, expire, cutoff in (("results", results.expire_results, before),
                                      ("groups", results.expire_groups, before),
                                      ("chords", results.expire_chords, chord_before)):
            while True:
                n = self._db(expire, before=cutoff, limit=limit)
                counts[table] += n
                if n < limit:
                    break
        return counts


def _short(value, limit: int = 255):
    if value is None:
        return None
    value = str(value)
    return value if len(value) <= limit else value[:limit]


def _attempt(meta: dict, request) -> int | None:
    """Which attempt of the task a state comes from (Celery's ``retries``), for ``store_result``'s rule
    that an earlier attempt never overwrites a later one.  The meta carries it only with
    ``result_extended``; the request always does."""
    for retries in (meta.get("retries"), getattr(request, "retries", None)):
        if isinstance(retries, int) and not isinstance(retries, bool):
            return retries
    return None
