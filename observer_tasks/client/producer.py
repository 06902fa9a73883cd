"""The apply layer's side: observe() and observe_late(), which never raise and never stall.

Each call costs the caller one Redis round trip: ``observe`` is one script
(``Store.observe_early``: dedupe, look, record), ``observe_late`` is the
admission (``Store.admit``: a lease stamped with Redis TIME, or a counted
drop). An admitted plan's first message is handed to the process's background
publisher (publisher.py) and the call returns 'enqueued' at once; a message
that is never sent leaves its lease to the worker's sweeper, so the plan is
still recorded exactly once.

Every call is bounded: Redis is reached through a fail-fast client (short
socket timeout, no retries). A hiccup costs latency, not observations: a call
whose round trip fails for a reason worth waiting out (a timeout, a lost
connection, BUSY, LOADING, a failover's READONLY) is handed to the publisher
thread and returns 'deferred'; so does every call after it until the thread
has replayed them all, so one stall costs one caller the per-call cap once and
every other caller nothing. Only when Redis has not answered the thread for
DEFER_PATIENCE_S does the Redis breaker open and refuse calls at once (counted;
1 s, doubling up to 30 s while failures continue). The broker has its own
breaker, so a dead broker does not stop the early observer. Every log line
here is throttled and none carries a traceback per call. Refusals are counted
in Redis by the publisher thread, off the caller's path, and at the latest
when the interpreter exits.

Fork safety: a child process after ``fork()`` forgets the parent's Producer
(never closing it: that would shut the parent's sockets) and builds its own on
its first call: its own clients, queue, thread and broker connection.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import threading
import time
import uuid
from typing import Any

import redis

from ..core import keys as K
from ..core.app import app
from ..core.heat import check_symbol, normalise_decision
from ..core.messages import LateMessage
from ..core.settings import CALL_TIMEOUT_S, Settings, SettingsError
from ..core.store import AccessRefused, Store, Unavailable, redis_client
from .publisher import (
    PUBLISH_TIMEOUT_S,
    REPLAY_TIMEOUT_S,
    Breaker,
    Deferred,
    Publisher,
    ThrottledLog,
    describe,
    transient,
)

log = logging.getLogger("observer_tasks")

#: What a Store call raises when Redis cannot answer (store.Unavailable); any other Redis error is treated
#: the same way here: the apply layer can only give up on this call, through the breaker.
REDIS_FAILURES: tuple[type[BaseException], ...] = (Unavailable, redis.RedisError, OSError)


class Producer:
    """One per process: settings, Redis client, breakers and the background publisher."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = app
        self.store = Store(settings, redis_client(settings.redis_url, CALL_TIMEOUT_S, "producer", settings))
        self.redis_breaker = Breaker("Redis")
        self.broker_breaker = Breaker("broker")
        self.problems = ThrottledLog()
        self.access_problems = ThrottledLog()
        # Tokens make a retried admission recognise its own lease (admit.lua): unique per process and call.
        self.token_prefix, self.token_serial = uuid.uuid4().hex[:12], itertools.count()  # (count: thread-safe)
        # Build Celery's lazy state here, in the caller's thread, not first in the publisher's: those first
        # builds take locks, and a fork() during one would leave the lock held in the child.
        _ = (app.amqp.router, app.amqp.queues, app.events, app.clock)
        # The thread's own Redis client: a longer timeout, so a stall up to REPLAY_TIMEOUT_S is waited out.
        thread_store = Store(settings, redis_client(settings.redis_url, REPLAY_TIMEOUT_S, "producer"))
        self.publisher = Publisher(thread_store, self.broker_breaker, REDIS_FAILURES, self.connect,
                                   self.redis_breaker)

    def connect(self) -> Any:
        """The publisher's broker connection: its own, short timeouts, no retries (the worker's connection
        settings, with long BRPOP reads, would stall it)."""
        url, sentinel_options, ssl = self.settings.celery_broker()
        if sentinel_options:
            sentinel_options["sentinel_kwargs"].update(socket_timeout=PUBLISH_TIMEOUT_S,
                                                       socket_connect_timeout=PUBLISH_TIMEOUT_S)
        return self.app.connection_for_write(
            url,
            connect_timeout=PUBLISH_TIMEOUT_S,
            ssl=ssl,
            transport_options={**self.app.conf.broker_transport_options, **sentinel_options,
                               "socket_timeout": PUBLISH_TIMEOUT_S,
                               "socket_connect_timeout": PUBLISH_TIMEOUT_S, "read_timeout": PUBLISH_TIMEOUT_S,
                               "write_timeout": PUBLISH_TIMEOUT_S, "max_retries": 0},
        )

    def close(self) -> None:
        self.publisher.close()
        self.store.client.close()
        self.publisher.store.client.close()

    # -- refusals -------------------------------------------------------------
    def refuse(self, obs_point: str, cause: str, message: str | None = None) -> str:
        """Count a refusal (written to Redis by the publisher thread) and return 'error'."""
        self.publisher.owe(K.Keys.refused_field(obs_point, cause))
        if message:
            self.problems.warning(message)
        return "error"

    def unavailable(self, obs_point: str, exc: BaseException) -> str:
        self.redis_breaker.failed(exc)
        return self.refuse(obs_point, "unavailable")

    def access_refused(self, obs_point: str, exc: AccessRefused) -> str:
        """Redis refuses this process's user: a configuration error, counted as config_error. No breaker: it is
        no outage, and a fixed password or ACL takes effect at the next call."""
        self.access_problems.warning(f"Redis refuses the apply layer's user ({exc}): a configuration error, not an "
                                     "outage; fix the password in REDIS_URL or the user's ACL (deploy/redis/users.acl)")
        return self.refuse(obs_point, "config_error")
    def defer(self, call: Deferred, exc: BaseException | None = None) -> str:
        """Hand the call to the publisher thread (Redis is slow): 'deferred', or 'error' (counted) when its
        buffer is full. ``exc``: this call's own attempt failed, so Redis may still have done it."""
        if exc is not None:
            call.attempted = True
            self.problems.warning(f"Redis slow ({describe(exc)}); calls are deferred to "
                                  "the background thread until it catches up")
        return "deferred" if self.publisher.defer(call) else "error"

    def refusal(self, obs_point: str, enabled: bool, plan_id: Any, symbol: Any, *breakers: Breaker) -> str | None:
        """Why this call must not observe ('disabled' or 'error'), or None when it may."""
        if not enabled:
            return "disabled"
        try:
            K.check_plan_id(plan_id)
            check_symbol(symbol)
        except K.InvalidInput as exc:
            return self.refuse(obs_point, "invalid_input", f"{obs_point}: {exc}")
        for breaker in breakers:
            if breaker.is_open():
                breaker.refuse()
                return self.refuse(obs_point, "unavailable")
        return None

    # -- the two calls ------------------------------------------------------------
    def observe(self, plan_id: Any, symbol: Any, apply_decision: Any) -> str:
        refused = self.refusal(K.OBS_EARLY, self.settings.heat_obs_enabled, plan_id, symbol, self.redis_breaker)
        if refused:
            return refused
        decision = normalise_decision(apply_decision)
        call = Deferred(K.OBS_EARLY, plan_id, symbol, decision, "", time.monotonic())
        if self.publisher.deferring:
            return self.defer(call)
        try:
            result = str(self.store.observe_early(plan_id, symbol, decision))
        except AccessRefused as exc:
            return self.access_refused(K.OBS_EARLY, exc)
        except REDIS_FAILURES as exc:
            return self.defer(call, exc) if transient(exc) else self.unavailable(K.OBS_EARLY, exc)
        self.redis_breaker.succeeded()
        return result

    def observe_late(self, plan_id: Any, symbol: Any, apply_decision: Any) -> str:
        # While the broker is known to be down, refuse (counted) rather than admit plans that the sweeper
        # would later record as timeouts: the refusal names the real cause.
        refused = self.refusal(K.OBS_LATE, self.settings.late_obs_enabled, plan_id, symbol, self.redis_breaker,
                               self.broker_breaker)
        if refused:
            return refused
        decision = normalise_decision(apply_decision)
        token = f"{self.token_prefix}-{next(self.token_serial)}"
        call = Deferred(K.OBS_LATE, plan_id, symbol, decision, token, time.monotonic())
        if self.publisher.deferring:
            return self.defer(call)
        try:
            admission = self.store.admit(plan_id, symbol, decision, call.token)
        except AccessRefused as exc:
            return self.access_refused(K.OBS_LATE, exc)
        except REDIS_FAILURES as exc:
            return self.defer(call, exc) if transient(exc) else self.unavailable(K.OBS_LATE, exc)
        self.redis_breaker.succeeded()
        if admission.status != "admitted":
            return str(admission.status)
        # A full queue leaves the plan to the sweeper (its lease stays): admitted all the same.
        self.publisher.submit(LateMessage(plan_id, symbol, decision, admission.published_ms, admission.deadline_ms))
        return "enqueued"


_producer: Producer | None = None
_producer_error: str | None = None
_init_lock = threading.Lock()
#: Producers inherited through fork(): kept, never used or closed, so the parent's sockets stay intact.
_inherited: list[Producer] = []


def producer() -> Producer | None:
    """The process's Producer, built on first use; None (logged once) if settings are bad."""
    global _producer, _producer_error
    if _producer is not None or _producer_error is not None:
        return _producer
    with _init_lock:
        if _producer is None and _producer_error is None:
            try:
                settings = Settings.from_env()
                _producer = Producer(settings)
                for line in settings.startup_lines():
                    log.warning(line)
            except SettingsError as exc:
                _producer_error = str(exc)
                log.error("P2.8A observer disabled by bad configuration: %s", exc)
            except Exception as exc:  # never fail the apply layer over the observer
                _producer_error = repr(exc)
                log.exception("P2.8A observer could not start")  # once: the error is kept, never retried
    return _producer


def reset() -> None:
    """Flush and forget the process's Producer (tests, and after the environment changes)."""
    global _producer, _producer_error
    with _init_lock:
        if _producer is not None:
            _producer.close()
        _producer, _producer_error = None, None


def _forget_inherited() -> None:
    """After fork(), in the child: drop the parent's Producer without touching it."""
    global _producer, _init_lock
    _init_lock = threading.Lock()  # may have been held by another thread of the parent
    if _producer is not None:
        _inherited.append(_producer)
        # Celery's Lamport clock is shared by every dispatcher; the parent's publisher may have held its lock.
        _producer.app.clock.mutex = threading.Lock()
        _producer = None


def _flush_at_exit() -> None:
    """A clean interpreter exit sends what is queued and pays the refusal counts (bounded, <= 1 s)."""
    p = _producer
    if p is not None and p.publisher.pid == os.getpid():
        try:
            p.publisher.close()
        except Exception:  # never fail an exit over the observer
            log.exception("P2.8A observer: exit flush failed; the sweeper will record unsent plans")


#: A bug reached the caller's thread: its traceback is logged at most once per LOG_EVERY_S, with a count.
_unexpected = ThrottledLog()

os.register_at_fork(after_in_child=_forget_inherited)
atexit.register(_flush_at_exit)


def observe(plan_id: Any, symbol: Any, apply_decision: Any = "") -> str:
    """The early observer: look once, record at create_apply_plan. Never raises."""
    try:
        p = producer()
        return p.observe(plan_id, symbol, apply_decision) if p else "error"
    except Exception:
        _unexpected.warning("unexpected error in observe()", exc_info=True)
        return "error"


def observe_late(plan_id: Any, symbol: Any, apply_decision: Any = "") -> str:
    """Admit the plan to late observation and hand its first message to the publisher. Never raises."""
    try:
        p = producer()
        return p.observe_late(plan_id, symbol, apply_decision) if p else "error"
    except Exception:
        _unexpected.warning("unexpected error in observe_late()", exc_info=True)
        return "error"
