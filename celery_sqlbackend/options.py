"""Transport options (``broker_transport_options``), with their defaults.

Every option is listed once, here.  Each can also be given as a Celery
setting named ``sqlq_<option>`` (see ``from_celery_conf``).  An option this module does not know is an
error, not silence: a typo such as ``heartbeat_intreval`` would otherwise leave
a production worker on the default.

==========================  ========  ==================================================
option                      default   meaning
==========================  ========  ==================================================
``polling_interval``        0.1 s     sleep between empty polls (PostgreSQL wakes on NOTIFY
                                      sooner; the poll is only the fallback there)
``table_prefix``            "sqlq_"   prefix of every table name
``create_tables``           auto      create missing tables on first use (default: on
                                      SQLite only; elsewhere run ``celery sqlq migrate``)
``heartbeat_interval``      60 s      how often a worker's process row is touched
``alive_threshold``         300 s     a process silent this long is pruned
``max_releases``            3         times a job may go back to the queue after its
                                      worker died before it is failed instead
``keep_finished``           86400 s   how long finished jobs are kept (0: delete at once)
``clear_batch_size``        500       rows deleted per maintenance batch
``dispatch_interval``       1.0 s     how often due scheduled (ETA) jobs are promoted
``busy_timeout``            30 s      SQLite busy timeout / lock wait (MySQL/MariaDB:
                                      the session's ``innodb_lock_wait_timeout``)
``use_notify``              True      LISTEN/NOTIFY wake-ups on PostgreSQL
``listen_url``              ""        a direct PostgreSQL URL for the LISTEN connection,
                                      when the store's URL goes through a pooler in
                                      transaction mode (``store.pooler``); without it,
                                      such a process polls
``sqlite_wake``             True      SQLite: wake idle workers at commit through sockets beside
                                      the file (``sqlite_wake``); False: poll only
``check_stale_deliveries``  True      prefork: a pool process checks an old delivery's claim before
                                      the task starts (frozen workers: ``stale_deliveries``)
``retry_attempts``          8         attempts for a transaction that lost a lock race
``event_loop``              auto      deliver through Celery's event loop (on every
                                      supported engine; False: Celery's blocking loop)
``record_task_failures``    True      a task that raised with no retries left keeps its
                                      job as a failed execution (class, message,
                                      traceback) for ``celery sqlq failed``; False: the
                                      job is finished, as with other brokers
==========================  ========  ==================================================
"""
from __future__ import annotations

import difflib
import math
import warnings
from dataclasses import dataclass, fields
from typing import Any, Mapping

from .errors import ConfigurationError

#: Options kombu or Celery themselves put into ``transport_options``; accepted
#: and ignored here so that standard Celery settings never trip the check.
_KOMBU_OPTIONS = frozenset({
    "max_retries", "interval_start", "interval_step", "interval_max", "confirm_publish",
    "client_properties", "retry_policy",
})


@dataclass(frozen=True)
class Options:
    polling_interval: float = 0.1
    table_prefix: str = "sqlq_"
    create_tables: bool | None = None
    heartbeat_interval: float = 60.0
    alive_threshold: float = 300.0
    max_releases: int = 3
    keep_finished: float = 86400.0
    clear_batch_size: int = 500
    dispatch_interval: float = 1.0
    busy_timeout: float = 30.0
    use_notify: bool = True
    listen_url: str = ""
    sqlite_wake: bool = True
    check_stale_deliveries: bool = True
    retry_attempts: int = 8
    event_loop: bool | None = None
    record_task_failures: bool = True

    @classmethod
    def from_mapping(cls, given: Mapping[str, Any] | None) -> "Options":
        given = dict(given or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(k for k in given if k not in known and k not in _KOMBU_OPTIONS)
        if unknown:
            raise ConfigurationError(
                f"unknown celery_sqlbackend transport option(s): {', '.join(_with_suggestion(unknown, known))}; "
                f"known options are: {', '.join(sorted(known))}")
        values = {}
        for name, value in given.items():
            if name not in known or value is None:
                continue
            default = known[name].default
            try:
                values[name] = _coerce(value, default)
            except (TypeError, ValueError):
                raise ConfigurationError(
                    f"transport option {name}={value!r} is not valid: expected a "
                    f"{type(default).__name__ if default is not None else 'bool'}") from None
        opts = cls(**values)
        opts.validate()
        return opts

    def validate(self) -> None:
        for name in ("polling_interval", "heartbeat_interval", "alive_threshold", "dispatch_interval",
                     "busy_timeout", "keep_finished"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ConfigurationError(f"transport option {name} must be a finite number of seconds, got {value!r}")
            if value < 0 or (value == 0 and name != "keep_finished"):
                raise ConfigurationError(
                    f"transport option {name} must be {'>= 0 (0: delete at once)' if name == 'keep_finished' else '> 0'}"
                    f", got {value!r}")
        if self.max_releases < 0 or self.clear_batch_size < 1 or self.retry_attempts < 1:
            raise ConfigurationError("max_releases must be >= 0, clear_batch_size and retry_attempts >= 1")
        if not self.table_prefix.replace("_", "").isalnum():
            raise ConfigurationError(f"table_prefix {self.table_prefix!r} may hold only letters, digits and _")
        if self.alive_threshold < 2 * self.heartbeat_interval:
            warnings.warn(
                f"alive_threshold ({self.alive_threshold}s) is less than twice heartbeat_interval "
                f"({self.heartbeat_interval}s): one late heartbeat will get a live worker pruned",
                RuntimeWarning, stacklevel=3)


#: ``sqlq_<name>`` settings that are not transport options: read by celery_sqlbackend.beat.
SCHEDULER_SETTINGS = frozenset({"beat_tick", "beat_grace"})


def from_celery_conf(conf) -> dict:
    """The transport options of a Celery config, with ``sqlq_<option>`` settings folded in.

    ``app.conf.sqlq_heartbeat_interval = 10`` is the same as
    ``broker_transport_options = {"heartbeat_interval": 10}``; an explicit
    transport option wins.
    """
    merged = sqlq_settings(conf)
    merged.update(conf.get("broker_transport_options") or {})
    return merged


def sqlq_settings(conf) -> dict:
    """Only the ``sqlq_<option>`` settings of a Celery config, as transport options."""
    merged = {}
    known = {f.name for f in fields(Options)} | SCHEDULER_SETTINGS
    for f in fields(Options):
        value = conf.get(f"sqlq_{f.name}")
        if value is not None:
            merged[f.name] = value
    unknown = sorted(k[len("sqlq_"):] for k in _keys(conf) if k.startswith("sqlq_") and k[len("sqlq_"):] not in known)
    if unknown:
        raise ConfigurationError(
            "unknown celery_sqlbackend setting(s): "
            f"{', '.join(_with_suggestion(unknown, known, 'sqlq_'))}; "
            f"known settings are sqlq_<option> for: {', '.join(sorted(known))}")
    return merged


def _keys(conf) -> list[str]:
    try:
        return [k for k in conf.keys() if isinstance(k, str)]
    except (AttributeError, TypeError):
        return []


def _with_suggestion(names: list[str], known, prefix: str = "") -> list[str]:
    """Each unknown name, with the known one it was most likely meant to be."""
    shown = []
    for name in names:
        close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
        shown.append(f"{prefix}{name} (did you mean {prefix}{close[0]}?)" if close else f"{prefix}{name}")
    return shown


def for_connection(client) -> dict:
    """The transport options of a kombu connection to ``client.hostname``, ``sqlq_*`` settings included.

    Why: Celery hands a connection only ``broker_transport_options``, and it
    opens connections in every process that uses the app (producers, beat,
    ``celery sqlq``, the worker), not only in a worker whose startup hook could
    fold the settings in.  The settings are read from the current Celery app
    when its broker is this database; the connection's own options win.
    """
    from celery import current_app

    from .urls import broker_database_url, database_url
    given = dict(client.transport_options or {})
    try:
        conf = current_app.conf
        if broker_database_url(conf) == database_url(client.hostname or ""):
            return {**sqlq_settings(conf), **given}
    except Exception:   # no usable app (a plain kombu program): the connection's options alone
        pass
    return given


def _coerce(value: Any, default: Any) -> Any:
    if isinstance(default, bool) or default is None:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        return bool(value)
    if isinstance(default, int):
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(value)
    if isinstance(default, float):
        return float(value)
    if not isinstance(value, str):
        raise TypeError(value)
    return value
