"""The late tasks (loaded by the worker alone): one look, then reschedule or stop.

A look is one atomic Redis step (look.lua) on Redis's clock: it records the plan when its heat is there or its
deadline has passed, says it is gone when its lease is already replaced by a record (the wake step, the sweeper
or another look recorded it: the chain ends), and otherwise says how long is left and whether the wake path is
healthy. Each run's outcome is one value: ``Recorded``, ``GONE``, or ``Again`` (the next look's countdown, why,
and its message): the safety interval while the wake path is healthy, POLL_MS otherwise, never past the
deadline, so the last look at the deadline always happens. A chain whose looks failed twice records
redis_error (LateMessage.gives_up). The message's times are informational: no decision trusts the sender's clock.

What Flower and exporters see of a plan (task id ``p28-late-{plan_id}``; worker/task_states.py): task-sent when
observe_late's message leaves (PENDING, with the first look's eta), task-retried when the first look finds the
plan still waiting (RETRY, its exception naming the next look), and one final event when the plan is decided,
whoever decided it (SUCCESS for a hit, a custom state such as TIMEOUT otherwise; its result the outcome): a look's
goes through the worker's FinalStates, which keeps it while the broker refuses it. The tasks send no events of
their own otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import redis
from celery import Task

from ..core.app import app
from ..core.connections import AccessRefused, Unavailable, describe
from ..core.inputs import InvalidInput
from ..core.ledger import GONE, Pending, Recorded
from ..core.messages import FAILED_LOOKS_MAX, LATE_OBSERVE, LATE_POLL, LateMessage, result
from ..core.timings import RECORD_PATIENCE_S
from . import task_states
from .context import WorkerContext, context_of

log = logging.getLogger("observer_tasks.late")


@dataclasses.dataclass(frozen=True)
class Again:
    """Look again: after ``countdown_ms``, with ``message`` (its polls and failed looks so far), because ``why``."""

    countdown_ms: int
    why: str
    message: LateMessage


#: Its task could not record the plan for RECORD_PATIENCE_S: its lease stays for the sweeper.
LEFT = "left to the sweeper"
Outcome = Recorded | Again | str


@app.task(name=LATE_OBSERVE, bind=True, send_events=False)
def late_observe(self: Task, *args: Any, **kwargs: Any) -> Any:
    """A plan's first look, sent by observe_late: RETRY in Flower when it reschedules the plan."""
    return run(self, args, kwargs, first=True)


@app.task(name=LATE_POLL, bind=True, send_events=False)
def late_poll(self: Task, *args: Any, **kwargs: Any) -> Any:
    """Every later look: the same work; only its decision shows in Flower (the plan's SUCCESS)."""
    return run(self, args, kwargs, first=False)


def run(task: Task, args: tuple[Any, ...], kwargs: dict[str, Any], first: bool) -> Any:
    """Never raises: whatever happens, the plan's lease is either recorded here or left to the sweeper."""
    try:
        msg = LateMessage.parse(args, kwargs)
    except InvalidInput as exc:
        # The lease (if any) stays: a bad message must not free a live plan; the sweeper records it.
        log.error("P2.8A.3: rejected late_observe message (%s): args=%.200r kwargs=%.200r", exc, args, kwargs)
        task_states.send(task, "task-failed", exception=f"InvalidInput({str(exc)!r})", traceback=None)
        return "rejected"
    ctx = context_of(task.app)
    try:
        while True:
            outcome = decide(ctx, msg)
            if isinstance(outcome, Recorded):  # decided here: the plan's one final state
                task_states.look_decided(task, ctx.final_states, msg.plan_id, outcome)
                return result(outcome.reason, outcome.wait_ms, "look")
            if not isinstance(outcome, Again):  # gone (its recorder sent the final state), or left to the sweeper
                return outcome
            if first:  # before the reschedule: the plan cannot be decided by a look before this event has left
                task_states.send(task, "task-retried", traceback=None,
                                 exception=f"Waiting({outcome.why}; next look in {outcome.countdown_ms} ms)")
                first = False
            if reschedule(task, ctx, outcome):
                return "rescheduled"
            msg = outcome.message  # the broker refused: look again in this worker, after the countdown
    except Exception as exc:  # a task that raises would lose its chain
        # A step that fails writes nothing: the lease stays, so the sweeper decides the plan at deadline + grace
        # once Redis takes the record, with this cause.
        if isinstance(exc, Unavailable | AccessRefused | redis.RedisError):  # Redis's reply: one line, no traceback
            log.error("P2.8A.3: could not record plan %s (%s); its lease is kept for the sweeper", msg.plan_id,
                      describe(exc))
        else:
            log.exception("P2.8A.3: late look of plan %s failed; its lease is kept for the sweeper", msg.plan_id)
        try:
            ctx.looks.note({msg.plan_id: describe(exc)}, failed=True)
        except Exception as note_exc:  # best effort: only the cause in debug_json is lost
            log.warning("P2.8A.3: could not note the cause for plan %s (%s)", msg.plan_id, describe(note_exc))
        return "failed"


def reschedule(task: Task, ctx: WorkerContext, again: Again) -> bool:
    """Send the next look through the broker (no worker slot is held while it waits); False when the broker
    refused, after waiting out the countdown here."""
    countdown_s = max(again.countdown_ms, 0) / 1000
    if ctx.settings.late_obs_queue_type == "quorum":
        # Native delayed delivery counts whole seconds: round up, so a look is never early.
        countdown_s = math.ceil(countdown_s)
    try:
        late_poll.apply_async(args=again.message.args(), kwargs=again.message.kwargs(), countdown=countdown_s,
                              task_id=task.request.id, retry=False)
        return True
    except Exception as exc:  # kombu wraps broker failures in many types
        log.warning("P2.8A.3: cannot reschedule plan %s (%s); looking again in this worker", again.message.plan_id,
                    describe(exc))
        time.sleep(countdown_s)
        return False


def decide(ctx: WorkerContext, msg: LateMessage) -> Outcome:
    """One run: record redis_error (the chain's looks failed twice) or look."""
    s = ctx.settings
    if ctx.decided.recently(msg.plan_id, s.dedupe_ttl_sec):
        return GONE  # recorded by this worker's wake step or sweeper: no need to ask Redis
    if msg.gives_up:
        return record_redis_error(ctx, msg)
    polls = msg.polls + 1
    start = time.monotonic()
    try:
        seen = ctx.looks.look(msg.plan_id, polls, msg.errors, msg.deadline_ms, ctx.gaps.pending)
    except (Unavailable, AccessRefused):
        # A failed look (a refused user too: the worker checked it at start-up, so its ACL changed since).
        ctx.gaps.failed()
        return Again(s.late_obs_poll_ms, "Redis did not answer the look",
                     dataclasses.replace(msg, polls=polls, errors=msg.errors + 1))
    if not isinstance(seen, Pending):
        return seen if isinstance(seen, Recorded) else GONE
    ctx.gaps.answered(seen.now_ms, time.monotonic() - start)
    interval = s.safety_poll_ms if seen.wake_healthy and s.late_obs_wake else s.late_obs_poll_ms
    left = seen.deadline_ms - seen.now_ms
    why = f"no heat {max(0, seen.now_ms - msg.published_ms)} ms after publish_plan, deadline in {left} ms"
    return Again(min(interval, left), why, dataclasses.replace(msg, polls=polls))


def record_redis_error(ctx: WorkerContext, msg: LateMessage) -> Outcome:
    """Record redis_error; while Redis still refuses, try again every POLL_MS for RECORD_PATIENCE_S, then leave
    the plan to the sweeper (which decides it by the gap the workers record)."""
    s = ctx.settings
    try:
        done = ctx.looks.finish(msg.plan_id, "redis_error", msg.polls)
        return done if isinstance(done, Recorded) else GONE
    except (Unavailable, AccessRefused) as exc:
        ctx.gaps.failed()
        attempts = msg.errors - FAILED_LOOKS_MAX + 1
        if attempts * s.late_obs_poll_ms >= RECORD_PATIENCE_S * 1000:
            log.error("P2.8A.3: could not record plan %s (%s); its lease is kept for the sweeper", msg.plan_id, exc)
            return LEFT
        return Again(s.late_obs_poll_ms, "Redis refused to record redis_error",
                     dataclasses.replace(msg, errors=msg.errors + 1))
