"""The apply layer's side: observe() and observe_late(), which never raise and never stall.

Each call costs the caller at most one Redis round trip on a fail-fast client (50 ms, no retries): ``observe``
is one step (the early look and its record), ``observe_late`` is the admission (a lease stamped with Redis
TIME, or the plan recorded at once, or a counted refusal). An admitted plan's first message is handed to the
sender and the call returns 'enqueued' at once. A call that meets a slow or unavailable Redis is handed to the
outbox ('deferred'), and the process's one background thread makes it when Redis answers (outbox.py); refusals
are counted by that thread, off the caller's path, and at the latest when the interpreter exits.

Fork safety: a child process after ``fork()`` forgets the parent's Producer (never closing it: that would shut
the parent's sockets) and builds its own on its first call: its own clients, outbox, sender and thread.
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

from ..core import contract as C
from ..core.app import app
from ..core.connections import describe, failure_kind, redis_client
from ..core.inputs import InvalidInput, check_decision, check_obs_point, check_plan_id, check_symbol
from ..core.ledger import Ledger, Recorded
from ..core.messages import LateMessage
from ..core.settings import LATE_POINT, Settings, SettingsError
from ..core.timings import CALL_TIMEOUT_S
from .background import Background
from .calls import Call
from .resilience import Breaker, ThrottledLog

log = logging.getLogger("observer_tasks")


class Producer:
    """One per process: settings, the callers' Redis client, and the background thread's outbox and sender."""

    def __init__(self, settings: Settings) -> None:
        self.settings, self.pid = settings, os.getpid()
        self.ledger = Ledger(settings, redis_client(settings.redis_url, CALL_TIMEOUT_S, "producer", settings))
        # Tokens let a call made again find its own lease: unique per process and call (count: thread-safe).
        self.token_prefix, self.token_serial = uuid.uuid4().hex[:12], itertools.count()
        # Build Celery's lazy state here, in the caller's thread, not first in the background thread: those first
        # builds take locks, and a fork() during one would leave the lock held in the child.
        _ = (app.amqp.router, app.amqp.queues, app.events, app.clock)
        self.broker_breaker = Breaker("broker")
        self.problems, self.access_problems = ThrottledLog(), ThrottledLog()
        self.background = Background(settings, self.broker_breaker, self.ledger.client)
        self.outbox, self.sender, self.wake = self.background.outbox, self.background.sender, self.background.wake

    def close(self) -> None:
        """Flush the background thread's work (bounded) and close the connections."""
        if os.getpid() != self.pid:
            return  # an inherited copy: its thread and connections are the parent's
        self.background.close()
        self.ledger.client.close()

    # -- the calls ------------------------------------------------------------------------------------------------
    def refuse(self, obs_point: str, cause: str, message: str | None = None) -> str:
        """Count a refusal (written to Redis by the background thread) and return 'error'."""
        self.outbox.owe(C.refused_field(obs_point, cause))
        if message:
            self.problems.warning(message)
        return "error"

    def failed(self, call: Call, exc: BaseException) -> str:
        """The call's own round trip failed: hold it (Redis slow or unavailable) or count the refusal."""
        kind = failure_kind(exc)
        if kind == "config_error":
            self.access_problems.warning(f"Redis refuses the apply layer's user ({describe(exc)}): a configuration "
                                         "error, not an outage; fix the password in REDIS_URL or the user's ACL "
                                         "(deploy/redis/users.acl)")
            return self.refuse(call.obs_point, "config_error")
        if kind == "error":  # the step failed on the data (a key of the wrong type ...): waiting will not help
            return self.refuse(call.obs_point, "unavailable", f"{call.obs_point}: Redis refused the call: "
                                                              f"{describe(exc)}")
        return "deferred" if self.outbox.hand_over(call, exc) else "error"

    def checked(self, obs_point: str, plan_id: Any, symbol: Any, decision: Any) -> tuple[str, str] | str:
        """The call's symbol and decision, or 'error' (counted) for a bad input."""
        try:
            check_plan_id(plan_id)
            return check_symbol(symbol), check_decision(decision)
        except InvalidInput as exc:
            return self.refuse(obs_point, "invalid_input", f"{obs_point}: {exc}")

    def observe(self, plan_id: Any, symbol: Any, apply_decision: Any, obs_point: Any = None) -> str:
        s = self.settings
        if not s.heat_obs_enabled:
            return "disabled"
        point = s.early_points[0] if obs_point is None else obs_point
        try:
            check_obs_point(point, s.early_points)
        except InvalidInput as exc:  # counted under the default point: a label outside the set would be a new series
            return self.refuse(s.early_points[0], "invalid_input", str(exc))
        inputs = self.checked(point, plan_id, symbol, apply_decision)
        if isinstance(inputs, str):
            return inputs
        call = Call(point, plan_id, *inputs, "", time.monotonic())
        if self.outbox.holding():
            return "deferred" if self.outbox.hand_over(call) else "error"
        try:
            result = str(self.ledger.early(plan_id, inputs[0], inputs[1], point))
        except Exception as exc:
            return self.failed(call, exc)
        if result != "duplicate":
            self.outbox.made(call, admitted=False)  # its entry, too, could be lost in a failover
        return result

    def observe_late(self, plan_id: Any, symbol: Any, apply_decision: Any) -> str:
        if not self.settings.late_obs_enabled:
            return "disabled"
        inputs = self.checked(LATE_POINT, plan_id, symbol, apply_decision)
        if isinstance(inputs, str):
            return inputs
        # While the broker is known to be down, refuse (counted) rather than admit plans whose first message
        # cannot be sent: the refusal names the real cause.
        if self.broker_breaker.is_open():
            self.broker_breaker.refuse()
            return self.refuse(LATE_POINT, "unavailable")
        call = Call(LATE_POINT, plan_id, *inputs, f"{self.token_prefix}-{next(self.token_serial)}", time.monotonic())
        if self.outbox.holding():
            return "deferred" if self.outbox.hand_over(call) else "error"
        try:
            admission = self.ledger.admit(plan_id, inputs[0], inputs[1], call.token)
        except Exception as exc:
            return self.failed(call, exc)
        if admission.status == "backlog":
            self.problems.warning("observe_late refused: too many plans wait past their deadline for a worker to "
                                  "decide them (are the workers down?)")
            return "error"
        if admission.status == "recorded":  # heat already there: recorded at once, no message to send
            self.outbox.made(call, admitted=False)
            self.sender.submit_recorded(LateMessage(plan_id, inputs[0], inputs[1], admission.published_ms,
                                                    admission.deadline_ms), Recorded(admission.reason, 0))
            self.wake()
            return "enqueued"
        if admission.status != "admitted":
            return str(admission.status)
        self.outbox.made(call)
        self.sender.submit(LateMessage(plan_id, inputs[0], inputs[1], admission.published_ms,
                                       admission.deadline_ms))
        self.wake()
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
        # Celery's Lamport clock is shared by every dispatcher; the parent's thread may have held its lock.
        app.clock.mutex = threading.Lock()
        _producer = None


def _flush_at_exit() -> None:
    """A clean interpreter exit makes the held calls, sends what is queued and pays the counts (bounded)."""
    p = _producer
    if p is not None and p.pid == os.getpid():
        try:
            p.close()
        except Exception:  # never fail an exit over the observer
            log.exception("P2.8A observer: exit flush failed; the sweeper will record unsent plans")


#: A bug reached the caller's thread: its traceback is logged at most once per LOG_EVERY_S, with a count.
_unexpected = ThrottledLog()

os.register_at_fork(after_in_child=_forget_inherited)
atexit.register(_flush_at_exit)


def observe(plan_id: Any, symbol: Any, apply_decision: Any = "", obs_point: Any = None) -> str:
    """The early observer: look once, record at ``obs_point`` (default: the first of P28_HEAT_OBS_POINTS,
    create_apply_plan). Never raises."""
    try:
        p = producer()
        return p.observe(plan_id, symbol, apply_decision, obs_point) if p else "error"
    except Exception:
        _unexpected.warning("unexpected error in observe()", exc_info=True)
        return "error"


def observe_late(plan_id: Any, symbol: Any, apply_decision: Any = "") -> str:
    """Admit the plan to late observation and hand its first message to the sender. Never raises."""
    try:
        p = producer()
        return p.observe_late(plan_id, symbol, apply_decision) if p else "error"
    except Exception:
        _unexpected.warning("unexpected error in observe_late()", exc_info=True)
        return "error"
