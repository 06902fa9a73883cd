"""The apply layer's side: observe() and observe_late(), which never raise and never stall.

Every call is bounded: Redis and the broker are reached through fail-fast
clients (short socket timeouts, no retries), and after a failure a small
circuit breaker refuses calls at once for a while (1 s, doubling up to 30 s
while failures continue; one breaker for Redis, one for the broker, so a dead
broker does not stop the early observer), so a broker that accepts connections but never
answers costs one short timeout per breaker period, not one per call.
Refusals are counted in Redis once it answers again, and logged at most once
per LOG_EVERY_S.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from typing import Any

from . import keys as K
from .heat import check_symbol, normalise_decision
from .settings import Settings, SettingsError
from .store import REDIS_DOWN, LeasePayload, Store, redis_client

log = logging.getLogger("observer_tasks")

#: Socket timeout of the apply layer's Redis and broker connections (s).
CALL_TIMEOUT_S = 0.05
BREAKER_FIRST_OPEN_S = 1.0
BREAKER_MAX_OPEN_S = 30.0
LOG_EVERY_S = 10.0


class Breaker:
    """Opens after a failure; lets one call try again when its period ends."""

    def __init__(self) -> None:
        self.open_until = 0.0
        self.period = BREAKER_FIRST_OPEN_S

    def is_open(self) -> bool:
        return time.monotonic() < self.open_until

    def failed(self) -> None:
        self.open_until = time.monotonic() + self.period
        self.period = min(self.period * 2, BREAKER_MAX_OPEN_S)

    def succeeded(self) -> None:
        self.period = BREAKER_FIRST_OPEN_S


class ThrottledLog:
    """Logs a problem at most once per LOG_EVERY_S, with how many were not logged."""

    def __init__(self) -> None:
        self.last = -LOG_EVERY_S
        self.quiet = 0

    def warning(self, message: str) -> None:
        now = time.monotonic()
        if now - self.last < LOG_EVERY_S:
            self.quiet += 1
            return
        suffix = f" ({self.quiet} more since the last report)" if self.quiet else ""
        log.warning("P2.8A observer: %s%s", message, suffix)
        self.last, self.quiet = now, 0


class Producer:
    """One per process: settings, clients, breaker and the counts owed to Redis."""

    def __init__(self, settings: Settings) -> None:
        from .tasks import app, late_observe

        self.settings = settings
        self.store = Store(settings, redis_client(settings.redis_url, CALL_TIMEOUT_S))
        self.task = late_observe
        # A connection of its own with short timeouts and no retries: the worker's
        # connection settings (long BRPOP reads) would stall the apply layer.
        self.connection = app.connection_for_write(
            settings.broker,
            connect_timeout=CALL_TIMEOUT_S,
            transport_options={**app.conf.broker_transport_options, "socket_timeout": CALL_TIMEOUT_S,
                               "socket_connect_timeout": CALL_TIMEOUT_S, "read_timeout": CALL_TIMEOUT_S,
                               "write_timeout": CALL_TIMEOUT_S, "max_retries": 0},
        )
        self.publish_lock = threading.Lock()  # a kombu connection is not thread-safe
        self.lock = threading.Lock()  # breakers and owed counts
        self.redis_breaker = Breaker()
        self.broker_breaker = Breaker()
        self.owed: Counter[str] = Counter()
        self.problems = ThrottledLog()

    def close(self) -> None:
        self.connection.release()
        self.store.client.close()

    # -- bookkeeping ------------------------------------------------------
    def refuse(self, obs_point: str, cause: str, message: str) -> str:
        with self.lock:
            self.owed[K.Keys.refused_field(obs_point, cause)] += 1
        self.problems.warning(message)
        return "error"

    def unavailable(self, obs_point: str, breaker: Breaker, exc: BaseException) -> str:
        with self.lock:
            breaker.failed()
        what = "Redis" if breaker is self.redis_breaker else "broker"
        return self.refuse(obs_point, "unavailable", f"{obs_point}: {what} unavailable ({exc!r:.200})")

    def pay_owed(self) -> None:
        if not self.owed:
            return
        with self.lock:
            owed, self.owed = self.owed, Counter()
        try:
            self.store.add_counts(dict(owed))
        except REDIS_DOWN:
            with self.lock:
                self.owed.update(owed)
            raise

    # -- the two calls ------------------------------------------------------
    def refusal(self, obs_point: str, enabled: bool, plan_id: Any, symbol: Any, *breakers: Breaker) -> str | None:
        """Why this call must not observe ('disabled' or 'error'), or None when it may."""
        if not enabled:
            return "disabled"
        try:
            K.check_plan_id(plan_id)
            check_symbol(symbol)
        except K.InvalidInput as exc:
            return self.refuse(obs_point, "invalid_input", str(exc))
        if any(breaker.is_open() for breaker in breakers):
            return self.refuse(obs_point, "unavailable", f"{obs_point} skipped: circuit open")
        return None

    def observe(self, plan_id: Any, symbol: Any, apply_decision: Any) -> str:
        refused = self.refusal(K.OBS_EARLY, self.settings.heat_obs_enabled, plan_id, symbol, self.redis_breaker)
        if refused:
            return refused
        try:
            self.pay_owed()
            heat, debug = self.store.look(plan_id)
            reason = heat.reason or ("redis_error" if debug.get("lookup_error") else "missing")
            recorded = self.store.record(
                plan_id=plan_id, symbol=symbol, obs_point=K.OBS_EARLY, heat=heat, reason=reason,
                apply_decision=normalise_decision(apply_decision), debug=debug,
            )
        except REDIS_DOWN as exc:
            return self.unavailable(K.OBS_EARLY, self.redis_breaker, exc)
        self.redis_breaker.succeeded()
        return reason if recorded else "duplicate"

    def observe_late(self, plan_id: Any, symbol: Any, apply_decision: Any) -> str:
        refused = self.refusal(K.OBS_LATE, self.settings.late_obs_enabled, plan_id, symbol, self.redis_breaker,
                               self.broker_breaker)
        if refused:
            return refused
        now_ms = int(time.time() * 1000)
        payload = LeasePayload(symbol, normalise_decision(apply_decision), now_ms,
                               now_ms + self.settings.late_obs_max_wait_ms)
        try:
            self.pay_owed()
            admitted = self.store.admit(plan_id, payload)
        except REDIS_DOWN as exc:
            return self.unavailable(K.OBS_LATE, self.redis_breaker, exc)
        self.redis_breaker.succeeded()
        if admitted != "admitted":
            return admitted
        with self.publish_lock:
            # Another thread may have found the broker dead while this one waited for the lock.
            failure: BaseException | None = ConnectionError("circuit open") if self.broker_breaker.is_open() else None
            if failure is None:
                try:
                    self.task.apply_async(
                        args=(plan_id, symbol, payload.apply_decision, payload.published_ms, payload.deadline_ms),
                        connection=self.connection, retry=False, task_id=f"p28-late-{plan_id}",
                    )
                except Exception as exc:  # kombu wraps broker failures in many types
                    failure = exc
        if failure is not None:
            # If Redis is down too, the lease ends on its own and the sweeper records the plan.
            with contextlib.suppress(*REDIS_DOWN):
                self.store.release(plan_id)
            if self.broker_breaker.is_open():
                return self.refuse(K.OBS_LATE, "unavailable", f"{K.OBS_LATE} skipped: circuit open")
            return self.unavailable(K.OBS_LATE, self.broker_breaker, failure)
        self.broker_breaker.succeeded()
        return "enqueued"


_producer: Producer | None = None
_producer_error: str | None = None
_init_lock = threading.Lock()


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
                log.exception("P2.8A observer could not start")
    return _producer


def reset() -> None:
    """Forget the process's Producer (tests, and after the environment changes)."""
    global _producer, _producer_error
    with _init_lock:
        if _producer is not None:
            _producer.close()
        _producer, _producer_error = None, None


def observe(plan_id: Any, symbol: Any, apply_decision: Any = "") -> str:
    """The early observer: look once, record at create_apply_plan. Never raises."""
    try:
        p = producer()
        return p.observe(plan_id, symbol, apply_decision) if p else "error"
    except Exception:
        log.exception("P2.8A observer: unexpected error in observe()")
        return "error"


def observe_late(plan_id: Any, symbol: Any, apply_decision: Any = "") -> str:
    """Admit the plan to late observation and enqueue its first look. Never raises."""
    try:
        p = producer()
        return p.observe_late(plan_id, symbol, apply_decision) if p else "error"
    except Exception:
        log.exception("P2.8A observer: unexpected error in observe_late()")
        return "error"
