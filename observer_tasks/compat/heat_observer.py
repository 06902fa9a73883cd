"""Drop-in for the apply layer's former ``heat_observer`` module (a thread pool inside the apply layer).

A team migrates by changing one import line::

    from observer_tasks.compat import heat_observer   # was: import heat_observer

The three functions keep the replaced module's names and parameters, so the replaced apply layer's three call
sites (``observe`` at create_apply_plan and in its reconcile-close consumer, ``observe_late_async`` after
publish_plan) stay as they are. They are thin: ``observe`` calls ``observer_tasks.observe`` with the
``obs_point`` it is given (one of P28_HEAT_OBS_POINTS: each point is recorded and deduplicated on its own, as
the replaced module did; another point is refused and counted, never relabelled), and
``observe_late_async`` calls ``observer_tasks.observe_late``, with the observer's own settings and connections.
The passed ``redis_client`` is not used, nor are the per-call settings (stream, prefix, TTL, debug cap, wait,
poll, workers, inflight): the observer has one configuration for every process. Where a passed value disagrees
with it, that is logged once per process and value, naming both. Both return None and never raise.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any
from urllib.parse import urlsplit

from ..client import producer as _producer
from ..client.resilience import ThrottledLog
from ..core.settings import LATE_POINT, TRUE_WORDS, Settings

log = logging.getLogger("observer_tasks")

#: Each setting's variable name, for the disagreement lines.
ENV_OF = {f.name: f.metadata["env"] for f in dataclasses.fields(Settings)}
_reported: set[tuple[str, str]] = set()
_reported_lock = threading.Lock()
_problems = ThrottledLog()


def is_enabled(env_value: Any) -> bool:
    """The replaced module's switch parser: true/1/yes/on (any case, spaces ignored) is on; anything else off."""
    try:
        return str(env_value).strip().lower() in TRUE_WORDS
    except Exception:  # a value whose str() fails: off, never an exception
        return False


def observe(redis_client: Any = None, plan_id: Any = None, symbol: Any = None, apply_decision: Any = None,
            obs_point: Any = "create_apply_plan", enabled: Any = True, stream_name: Any = None,
            lookup_prefix: Any = None, dedupe_ttl_sec: Any = None, max_debug_chars: Any = None) -> None:
    """An early observation at ``obs_point`` (``observer_tasks.observe``). Returns None, never raises."""
    try:
        if not enabled:
            return
        _check(redis_client, {"stream_name": (stream_name, "obs_stream"),
                              "lookup_prefix": (lookup_prefix, "heat_lookup_prefix"),
                              "dedupe_ttl_sec": (dedupe_ttl_sec, "dedupe_ttl_sec"),
                              "max_debug_chars": (max_debug_chars, "max_debug_chars")})
        _producer.observe(plan_id, symbol, apply_decision, obs_point)
    except Exception:  # never fail the apply layer over the observer
        _problems.warning("unexpected error in heat_observer.observe()", exc_info=True)


def observe_late_async(redis_client: Any = None, plan_id: Any = None, symbol: Any = None, lookup_prefix: Any = None,
                       apply_decision: Any = None, obs_stream: Any = None, max_wait_ms: Any = None,
                       poll_ms: Any = None, dedupe_ttl_sec: Any = None, max_debug_chars: Any = None,
                       obs_point: Any = LATE_POINT, logger: Any = None, max_workers: Any = None,
                       max_inflight: Any = None) -> None:
    """The late observation after publish_plan (``observer_tasks.observe_late``: admission, then the worker).
    Returns None at once, never raises. ``logger`` is accepted and unused: the observer logs to
    ``observer_tasks``."""
    try:
        _check(redis_client, {"obs_point": (obs_point, LATE_POINT), "obs_stream": (obs_stream, "obs_stream"),
                              "lookup_prefix": (lookup_prefix, "heat_lookup_prefix"),
                              "max_wait_ms": (max_wait_ms, "late_obs_max_wait_ms"),
                              "poll_ms": (poll_ms, "late_obs_poll_ms"),
                              "max_workers": (max_workers, "late_obs_max_workers"),
                              "max_inflight": (max_inflight, "late_obs_max_inflight"),
                              "dedupe_ttl_sec": (dedupe_ttl_sec, "dedupe_ttl_sec"),
                              "max_debug_chars": (max_debug_chars, "max_debug_chars")})
        _producer.observe_late(plan_id, symbol, apply_decision)
    except Exception:  # never fail the apply layer over the observer
        _problems.warning("unexpected error in heat_observer.observe_late_async()", exc_info=True)


def _check(redis_client: Any, passed: dict[str, tuple[Any, str]]) -> None:
    """Log once per process and value each passed setting that is not the observer's own, naming both."""
    p = _producer.producer()
    if p is None:
        return  # bad configuration: already logged, and the call returns "error" (counted)
    settings: Settings = p.settings
    for name, (value, field) in passed.items():
        if value is None:
            continue
        ours = field if name == "obs_point" else getattr(settings, field)
        same = str(value) == str(ours) if isinstance(ours, str) else _as_int(value) == ours
        if not same:
            env = "the observation point" if name == "obs_point" else ENV_OF[field]
            _once(name, value, f"heat_observer: {name}={value!r} passed, the observer uses {env}={ours!r}")
    where = _client_address(redis_client)
    if where is not None and where != _url_address(settings.redis_url):
        _once("redis_client", where, f"heat_observer: the passed redis_client is {where}, not used; the observer "
                                     f"uses REDIS_URL ({_url_address(settings.redis_url)})")


def _once(name: str, value: Any, line: str) -> None:
    key = (name, repr(value)[:200])
    with _reported_lock:
        if key in _reported or len(_reported) >= 1000:
            return
        _reported.add(key)
    log.warning("P2.8A observer: %s", line)


def _as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _client_address(client: Any) -> str | None:
    """host:port/db of a redis-py client, or None when it is not one we can read."""
    try:
        kw = client.connection_pool.connection_kwargs
        return f"{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"
    except AttributeError:
        return None


def _url_address(url: str) -> str:
    parts = urlsplit(url)
    db = (parts.path or "/0").lstrip("/") or "0"
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}/{db}"


__all__ = ["is_enabled", "observe", "observe_late_async"]
