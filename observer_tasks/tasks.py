"""The Celery app and the late task: look once, then reschedule or record.

One message per look. The message carries the plan's absolute deadline
(publish time + MAX_WAIT_MS, epoch ms), so a slow or restarted worker makes
fewer looks, never a longer wait. Stop conditions, first one wins:
heat found (ok, or parse_error when unreadable), the second failed lookup
(redis_error), the deadline reached (timeout). A message that arrives more than
one poll interval after its deadline records timeout without looking.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from celery import Celery, Task

from . import keys as K
from .heat import Heat, check_symbol, normalise_decision
from .settings import Settings
from .store import REDIS_DOWN, Store, redis_client

log = logging.getLogger("observer_tasks.late")

app = Celery("observer_tasks")
app.config_from_object("celeryconfig")

#: Socket timeout of the worker's Redis client (s): a look that takes longer is a failed look.
LOOKUP_TIMEOUT_S = 0.5
#: How long a finished observation keeps trying to reach Redis before leaving it to the sweeper (s).
RECORD_PATIENCE_S = 30.0
#: A deadline further ahead than MAX_WAIT_MS plus this is not from our producer (ms).
DEADLINE_SLACK_MS = 60_000


@dataclass(frozen=True)
class LateMessage:
    plan_id: str
    symbol: str
    apply_decision: str
    published_ms: int
    deadline_ms: int
    polls: int = 0
    errors: int = 0

    @classmethod
    def parse(cls, args: tuple[Any, ...], kwargs: dict[str, Any]) -> LateMessage:
        try:
            msg = cls(*args, **kwargs)
        except TypeError as exc:
            raise K.InvalidInput(f"bad task arguments: {exc}") from None
        K.check_plan_id(msg.plan_id)
        check_symbol(msg.symbol)
        for name in ("published_ms", "deadline_ms", "polls", "errors"):
            value = getattr(msg, name)
            if type(value) is not int or value < 0:
                raise K.InvalidInput(f"{name}={value!r} is not a non-negative integer")
        if msg.deadline_ms < msg.published_ms:
            raise K.InvalidInput(f"deadline_ms={msg.deadline_ms} is before published_ms={msg.published_ms}")
        return msg

    def args(self) -> tuple[Any, ...]:
        return (self.plan_id, self.symbol, self.apply_decision, self.published_ms, self.deadline_ms)


_worker_state: tuple[int, Settings, Store] | None = None


def worker_store() -> tuple[Settings, Store]:
    """This process's settings and Store (rebuilt after a fork)."""
    global _worker_state
    if _worker_state is None or _worker_state[0] != os.getpid():
        settings = Settings.from_env()
        _worker_state = (os.getpid(), settings, Store(settings, redis_client(settings.redis_url, LOOKUP_TIMEOUT_S)))
    return _worker_state[1], _worker_state[2]


TASK_OPTIONS: dict[str, Any] = {"bind": True, "ignore_result": True, "acks_late": True, "reject_on_worker_lost": True}


@app.task(name="observer_tasks.late_observe", **TASK_OPTIONS)
def late_observe(self: Task, *args: Any, **kwargs: Any) -> str:
    """A plan's first look: sent by observe_late, with task events, so Flower and exporters see every plan."""
    return look_once(self, args, kwargs)


@app.task(name="observer_tasks.late_poll", send_events=False, **TASK_OPTIONS)
def late_poll(self: Task, *args: Any, **kwargs: Any) -> str:
    """Every later look: the same work without task events, which would triple the cost of each poll."""
    return look_once(self, args, kwargs)


def look_once(task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    settings, store = worker_store()
    try:
        msg = LateMessage.parse(args, kwargs)
    except K.InvalidInput as exc:
        return reject(store, args, kwargs, str(exc))
    if msg.deadline_ms - time.time() * 1000 > settings.late_obs_max_wait_ms + DEADLINE_SLACK_MS:
        return reject(store, args, kwargs, f"deadline_ms={msg.deadline_ms} is too far in the future")
    return observe_until_done(task, settings, store, msg)


def observe_until_done(task: Task, settings: Settings, store: Store, msg: LateMessage) -> str:
    """Look, then reschedule through the broker; look again here only if the broker is down."""
    while True:
        now_ms = int(time.time() * 1000)
        if now_ms > msg.deadline_ms + settings.late_obs_poll_ms:
            late = now_ms - msg.deadline_ms
            return finish(store, msg, now_ms, Heat(False, ""), "timeout", {"cause": f"arrived {late}ms late"})
        heat, debug = store.look(msg.plan_id)
        polls, errors = msg.polls + 1, msg.errors + (1 if "lookup_error" in debug else 0)
        msg = dataclasses.replace(msg, polls=polls, errors=errors)
        if heat.found:
            return finish(store, msg, now_ms, heat, heat.reason, debug)
        if errors >= 2:
            return finish(store, msg, now_ms, heat, "redis_error", debug)
        if now_ms >= msg.deadline_ms:
            return finish(store, msg, now_ms, heat, "timeout", debug)
        countdown_s = min(settings.late_obs_poll_ms, msg.deadline_ms - now_ms) / 1000
        try:
            late_poll.apply_async(args=msg.args(), kwargs={"polls": polls, "errors": errors},
                                  countdown=countdown_s, task_id=task.request.id, retry=False)
            return "rescheduled"
        except Exception as exc:  # kombu wraps broker failures in many types
            log.warning("P2.8A.3: cannot reschedule plan %s (%r); looking again in this worker", msg.plan_id, exc)
            time.sleep(countdown_s)


def finish(store: Store, msg: LateMessage, now_ms: int, heat: Heat, reason: str, debug: dict[str, Any]) -> str:
    """Record the observation, waiting out a Redis outage for up to RECORD_PATIENCE_S."""
    from .metrics import heat_wait_bucket

    wait_ms = max(0, now_ms - msg.published_ms)
    extra = {"wait_ms": str(wait_ms), "polls": str(msg.polls)}
    debug = {"polls": msg.polls, "wait_ms": wait_ms, **({"errors": msg.errors} if msg.errors else {}), **debug}
    hit = heat_wait_bucket(store.settings, wait_ms) if reason == "ok" else None
    give_up = time.monotonic() + RECORD_PATIENCE_S
    pause = 0.1
    while True:
        try:
            store.record(plan_id=msg.plan_id, symbol=msg.symbol, obs_point=K.OBS_LATE, heat=heat, reason=reason,
                         apply_decision=normalise_decision(msg.apply_decision), debug=debug, extra=extra,
                         heat_wait=(hit, wait_ms / 1000) if hit else None)
            return reason
        except REDIS_DOWN as exc:
            if time.monotonic() > give_up:
                log.error("P2.8A.3: could not record plan %s (%r); the sweeper will record it", msg.plan_id, exc)
                return "unrecorded"
            time.sleep(pause)
            pause = min(pause * 2, 2.0)


def reject(store: Store, args: tuple[Any, ...], kwargs: dict[str, Any], why: str) -> str:
    """Drop a message we cannot trust: log it, free its lease, never retry it."""
    log.error("P2.8A.3: rejected late_observe message (%s): args=%.200r kwargs=%.200r", why, args, kwargs)
    plan_id = args[0] if args else kwargs.get("plan_id")
    try:
        store.release(K.check_plan_id(plan_id))
    except (K.InvalidInput, *REDIS_DOWN):
        pass
    return "rejected"
