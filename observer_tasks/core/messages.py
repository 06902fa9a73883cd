"""What travels through the broker: the queue, the task names and the late message, defined once.

The apply layer sends the first message by name (``Celery.send_task``) and the worker registers the tasks
(worker/tasks.py), so neither side imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from celery.utils.saferepr import saferepr

from .contract import task_id
from .inputs import InvalidInput, check_plan_id, check_symbol

#: The one queue of the late observer: first messages and every reschedule.
QUEUE = "late_obs"
#: A plan's first look, sent by observe_late (its task-sent makes the plan's task in Flower and exporters).
LATE_OBSERVE = "observer_tasks.late_observe"
#: Every later look, under the same task id (worker/task_states.py: what each plan's task shows).
LATE_POLL = "observer_tasks.late_poll"
#: A chain whose looks failed this many times in a row records redis_error (the contract's "gives up after two
#: failed polls"): the next run records instead of looking.
FAILED_LOOKS_MAX = 2


@dataclass(frozen=True)
class LateMessage:
    """A late task's arguments: the plan, and its times on Redis's clock (informational: no decision trusts
    them), with how many looks and failed looks (``errors``) came before."""

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
            raise InvalidInput(f"bad task arguments: {exc}") from None
        check_plan_id(msg.plan_id)
        check_symbol(msg.symbol)
        for name in ("published_ms", "deadline_ms", "polls", "errors"):
            value = getattr(msg, name)
            if type(value) is not int or value < 0:
                raise InvalidInput(f"{name}={value!r} is not a non-negative integer")
        return msg

    @property
    def gives_up(self) -> bool:
        """Its looks failed FAILED_LOOKS_MAX times: this run records redis_error instead of looking."""
        return self.errors >= FAILED_LOOKS_MAX

    def args(self) -> tuple[Any, ...]:
        return (self.plan_id, self.symbol, self.apply_decision, self.published_ms, self.deadline_ms)

    def kwargs(self) -> dict[str, int]:
        return {"polls": self.polls, "errors": self.errors}


def result(reason: str, wait_ms: int, recorded_by: str) -> dict[str, Any]:
    """A decided plan's task result, as Flower and exporters show it (its reason, wait and recorder)."""
    return {"reason": reason, "wait_ms": wait_ms, "recorded_by": recorded_by}


def succeeded(outcome: dict[str, Any]) -> dict[str, Any]:
    """A final event's fields: the result as Celery sends it (its repr), the plan's wait as the runtime, and the
    first look's RETRY exception cleared (Flower would still show it beside the final state)."""
    return {"result": repr(outcome), "runtime": outcome["wait_ms"] / 1000, "exception": None, "traceback": None}


def final_event(plan_id: str, reason: str, wait_ms: int, recorded_by: str) -> tuple[str, dict[str, Any]]:
    """A plan's one final event (type, fields): task-succeeded for a hit (``ok``: SUCCESS), ``task-<reason>`` for
    any other outcome (Celery's event State makes an unknown task-* type a custom state: TIMEOUT, REDIS_ERROR,
    MISSING, PARSE_ERROR), with the result and runtime, and the task's name and queue, so that a monitor whose
    State lost (or never had) the plan's task-sent still names it."""
    fields = {"uuid": task_id(plan_id), "name": LATE_OBSERVE, "queue": QUEUE,
              **succeeded(result(reason, wait_ms, recorded_by))}
    return ("task-succeeded" if reason == "ok" else f"task-{reason}"), fields


def task_sent(message: LateMessage, celery_fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """A plan's task-sent fields: Celery's own (``celery_fields``, as its send_task builds them; the same shape
    when the admission recorded the plan and no message was sent), plus ``received``: the plan's publish time
    (Redis's clock, s), which Flower's task list sorts by, newest first."""
    uuid = task_id(message.plan_id)
    fields = celery_fields or {
        "uuid": uuid, "root_id": uuid, "parent_id": None, "name": LATE_OBSERVE, "args": saferepr(message.args()),
        "kwargs": saferepr({}), "retries": 0, "eta": None, "expires": None, "queue": QUEUE, "exchange": "",
        "routing_key": QUEUE}
    return {**fields, "received": message.published_ms / 1000}
