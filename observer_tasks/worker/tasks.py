"""The late tasks (loaded by the worker alone): one look, then reschedule or stop.

A look is one atomic Redis step (look.lua) on Redis's clock: it records the plan when
its heat is there or its deadline has passed, says 'gone' when the plan's lease is already removed
(recorded by the wake step, the sweeper or another look: the chain ends without looking again), and
otherwise says how long is left and whether the wake path is healthy. The chain then reschedules with
the safety interval while the wake path is healthy, POLL_MS otherwise, never past the deadline, so the
last look at the deadline always happens. Two failed looks end the plan as redis_error.
The message's times are informational: no decision trusts the sender's clock.

What Flower and exporters see of a plan (task id ``p28-late-{plan_id}``; worker/task_states.py): task-sent
when observe_late's message leaves (PENDING, with the first look's eta), task-retried when the first look
finds the plan still waiting (RETRY, Celery's state for a task that runs again later, its exception naming
the next look), and one task-succeeded when the plan is decided, whoever decided it (SUCCESS, its result
the outcome: reason, wait_ms, recorded_by). The tasks send no events of their own otherwise: each event
is a broker message, and most plans are decided by the wake step between two looks.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any

import redis
from celery import Task

from ..core import keys as K
from ..core.app import app
from ..core.messages import LATE_OBSERVE, LATE_POLL, LateMessage
from ..core.settings import LOOKUP_TIMEOUT_S, RECORD_PATIENCE_S, Settings
from ..core.store import AccessRefused, Look, Store, Unavailable, redis_client
from . import task_states

log = logging.getLogger("observer_tasks.late")


_worker_state: tuple[int, Settings, Store] | None = None


def worker_store() -> tuple[Settings, Store]:
    """This process's settings and Store (rebuilt after a fork)."""
    global _worker_state
    if _worker_state is None or _worker_state[0] != os.getpid():
        settings = Settings.from_env()
        _worker_state = (os.getpid(), settings,
                         Store(settings, redis_client(settings.redis_url, LOOKUP_TIMEOUT_S, "look", settings)))
    return _worker_state[1], _worker_state[2]


@app.task(name=LATE_OBSERVE, bind=True, send_events=False)
def late_observe(self: Task, *args: Any, **kwargs: Any) -> Any:
    """A plan's first look, sent by observe_late: RETRY in Flower when it reschedules the plan."""
    return look_once(self, args, kwargs, first=True)


@app.task(name=LATE_POLL, bind=True, send_events=False)
def late_poll(self: Task, *args: Any, **kwargs: Any) -> Any:
    """Every later look: the same work; only its decision shows in Flower (the plan's SUCCESS)."""
    return look_once(self, args, kwargs, first=False)


def look_once(task: Task, args: tuple[Any, ...], kwargs: dict[str, Any], first: bool) -> Any:
    """Never raises: whatever happens, the plan's lease is either recorded here or left to the sweeper."""
    try:
        msg = LateMessage.parse(args, kwargs)
    except K.InvalidInput as exc:
        # The lease (if any) stays: a bad message must not free a live plan; the sweeper records it.
        log.error("P2.8A.3: rejected late_observe message (%s): args=%.200r kwargs=%.200r", exc, args, kwargs)
        task_states.send(task, "task-failed", exception=f"InvalidInput({str(exc)!r})", traceback=None)
        return "rejected"
    try:
        settings, store = worker_store()
        return observe_until_done(task, settings, store, msg, first)
    except Exception as exc:  # a task that raises would lose its chain
        # A step that fails writes nothing (it checks all before its first write): the lease stays, so the
        # sweeper records the plan at deadline + grace once Redis takes the record, with this cause.
        text = f"{type(exc).__name__}: {exc}"[:200]
        if isinstance(exc, redis.RedisError | AccessRefused):
            log.error("P2.8A.3: could not record plan %s (%s); its lease is kept for the sweeper", msg.plan_id, text)
        else:
            log.exception("P2.8A.3: late look of plan %s failed; its lease is kept for the sweeper", msg.plan_id)
        try:
            worker_store()[1].note_failed(msg.plan_id, text)
        except Exception as note_exc:  # best effort: only the cause in debug_json is lost
            log.warning("P2.8A.3: could not note the cause for plan %s (%r)", msg.plan_id, note_exc)
        return "failed"


def observe_until_done(task: Task, settings: Settings, store: Store, msg: LateMessage, first: bool) -> Any:
    """Look (or, after two failed looks, record redis_error), then reschedule through the broker.

    Nothing here waits in the worker: a slot is held only while Redis answers, so an outage that fails
    every plan's look cannot starve the plans still looking. Only a dead broker makes it look again here.
    """
    while True:
        if msg.errors >= 2:
            outcome, interval_ms, why = finish_redis_error(settings, store, msg)
        else:
            outcome, interval_ms, why = look(settings, store, msg)
        if isinstance(outcome, Look):  # decided here: the plan's one final state
            result = task_states.result(outcome.reason, outcome.wait_ms, "look")
            task_states.send(task, "task-succeeded", **task_states.succeeded(result))
            return result
        if isinstance(outcome, str):  # gone (its recorder sent the final state), or left to the sweeper
            return outcome
        msg = outcome
        countdown_s = max(interval_ms, 0) / 1000
        if settings.late_obs_queue_type == "quorum":
            # Native delayed delivery truncates to whole seconds: round up, so the last look is never early.
            countdown_s = math.ceil(countdown_s)
        if first:
            # Before the reschedule: the plan cannot be decided by a look before this event has left.
            task_states.send(task, "task-retried", exception=f"Waiting({why}; next look in {interval_ms} ms)",
                             traceback=None)
            first = False
        try:
            late_poll.apply_async(args=msg.args(), kwargs=msg.kwargs(),
                                  countdown=countdown_s, task_id=task.request.id, retry=False)
            return "rescheduled"
        except Exception as exc:  # kombu wraps broker failures in many types
            log.warning("P2.8A.3: cannot reschedule plan %s (%r); looking again in this worker", msg.plan_id, exc)
            time.sleep(countdown_s)


def look(settings: Settings, store: Store, msg: LateMessage) -> tuple[Look | str | LateMessage, int, str]:
    """One look: the recorded Look, 'gone', or the next message, its countdown and why it waits."""
    if task_states.decided_here(msg.plan_id, settings.dedupe_ttl_sec):
        return "gone", 0, ""  # recorded by this worker's wake step or sweeper: no need to ask Redis
    polls = msg.polls + 1
    try:
        seen = store.look(msg.plan_id, polls, msg.errors, msg.deadline_ms)
    except (Unavailable, AccessRefused):
        # A failed look (a refused user too: the worker checked it at start-up, so its ACL changed since);
        # the second one ends the plan as redis_error (recorded by the next run).
        return dataclasses.replace(msg, polls=polls, errors=msg.errors + 1), settings.late_obs_poll_ms, \
            "Redis did not answer the look"
    if seen.status == "recorded":
        return seen, 0, ""
    if seen.status != "pending":
        return seen.status, 0, ""
    healthy = seen.wake_healthy and settings.late_obs_wake
    interval = settings.safety_poll_ms if healthy else settings.late_obs_poll_ms
    left = seen.deadline_ms - seen.now_ms
    why = f"no heat {max(0, seen.now_ms - msg.published_ms)} ms after publish_plan, deadline in {left} ms"
    return dataclasses.replace(msg, polls=polls), min(interval, left), why


def finish_redis_error(settings: Settings, store: Store, msg: LateMessage) -> tuple[Look | str | LateMessage, int, str]:
    """Record redis_error; while Redis still refuses, try again every POLL_MS for RECORD_PATIENCE_S,
    then leave the plan to the sweeper (which records redis_error too, having seen the outage)."""
    try:
        done = store.finish(msg.plan_id, "redis_error", {"polls": msg.polls, "errors": 2})
        return (done if done.status == "recorded" else "gone"), 0, ""
    except (Unavailable, AccessRefused) as exc:
        attempts = msg.errors - 2 + 1
        if attempts * settings.late_obs_poll_ms >= RECORD_PATIENCE_S * 1000:
            log.error("P2.8A.3: could not record plan %s (%s); its lease is kept for the sweeper", msg.plan_id, exc)
            return "unrecorded", 0, ""
        return dataclasses.replace(msg, errors=msg.errors + 1), settings.late_obs_poll_ms, \
            "Redis refused to record redis_error"
