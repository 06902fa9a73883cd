"""Each plan's life in Flower and exporters: its task's states, sent as Celery task events.

A plan has one task id, ``p28-late-{plan_id}``, for its first look and every later look. Its events:
task-sent (sent by the apply process: PENDING, with the first look's eta, and the plan's publish time as
``received``, so Flower's list shows the newest plans first), task-retried once if its first look finds it still
waiting (RETRY: Celery's state for a task that will run again; the exception names why and the next look), and
exactly one final event when it is decided, sent by whoever decided it: the look, the wake step, the sweeper (the
worker's ``FinalStates``), or the admission itself (the apply process). The final event is task-succeeded for a
hit (SUCCESS) and ``task-<reason>`` for any other outcome, which Celery's event State turns into a custom state
(TIMEOUT, REDIS_ERROR, MISSING, PARSE_ERROR: another badge in Flower's list, searchable as ``state:TIMEOUT``); both
carry the result ``{'reason': ..., 'wait_ms': ..., 'recorded_by': ...}`` as in the stream entry, runtime = wait_ms
in s, and the task's name and queue (core/messages.py ``final_event``).

Nothing is stuck after a broker failure: FinalStates keeps every final event the broker refused and sends it
again (bounded: OUTBOX_MAX events, EVENTS_KEEP_S), from one thread with its own broker connection, so that neither
a look nor the wake step nor the sweeper waits for the broker.

A RETRY arriving after the final event would win in Flower (celery.events.state lets RETRY overwrite any state),
so the final events of the wake step and the sweeper leave FINAL_STATE_DELAY_S after the decision, and the first
look's RETRY leaves within RETRY_FRESH_S of that look's decision to send it, or not at all (a plan then shows
PENDING until its final state). A RETRY is never kept for later.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from typing import Any, NamedTuple

from ..core.connections import describe
from ..core.ledger import Recorded
from ..core.messages import LATE_OBSERVE, QUEUE, final_event
from ..core.timings import EVENTS_KEEP_S, EVENTS_RETRY_S, FINAL_STATE_DELAY_S, OUTBOX_MAX, RETRY_FRESH_S
from .context import Decided

log = logging.getLogger("observer_tasks.worker")


def send(task: Any, type_: str, **fields: Any) -> None:
    """One event for the plan of a running task (its id, name and queue), from the task; never raises, never
    waits past RETRY_FRESH_S for a task-retried (it is dropped instead: see the module's docstring)."""
    asked = time.monotonic()
    try:
        with task.app.events.default_dispatcher(hostname=task.request.hostname) as dispatcher:
            if type_ == "task-retried" and time.monotonic() - asked > RETRY_FRESH_S:
                log.debug("P2.8A.3: RETRY event for %s not sent (the broker was slow to connect)", task.request.id)
                return
            dispatcher.send(type_, uuid=task.request.id, retry=False, name=LATE_OBSERVE, queue=QUEUE, **fields)
    except Exception as exc:  # kombu wraps broker failures in many types
        log.debug("P2.8A.3: %s event for %s not sent (%r)", type_, task.request.id, exc)


def look_decided(task: Any, states: FinalStates | None, plan_id: str, outcome: Recorded) -> None:
    """The final event of a plan a look recorded: handed to the worker's FinalStates (kept until the broker takes
    it), or sent from the task where no worker built one (an eager call)."""
    if states is not None:
        states.looked(plan_id, outcome)
        return
    type_, fields = final_event(plan_id, outcome.reason, outcome.wait_ms, "look")
    fields.pop("uuid")
    send(task, type_, **fields)


class Kept(NamedTuple):
    due: float  # monotonic: not sent before
    at: float  # monotonic: when it was decided (its age)
    type: str
    fields: dict[str, Any]


class FinalStates(threading.Thread):
    """Sends the final event of every plan this worker decides, in the order given; keeps what the broker refuses
    and tries again every EVENTS_RETRY_S on a new connection."""

    def __init__(self, app: Any, hostname: str, decided: Decided) -> None:
        super().__init__(name="p28-task-states", daemon=True)
        self.app = app
        self.hostname = hostname
        self.decided_here = decided
        self.cond = threading.Condition()
        self.pending: deque[Kept] = deque()
        self.stopping = False
        self.connection: Any = None
        self.dispatcher: Any = None
        self.retry_at = 0.0
        self.failing_since: float | None = None
        self.sent = 0
        self.dropped = 0  # given up: the queue full (oldest first), or older than EVENTS_KEEP_S
        self.full = False

    def decided(self, outcomes: dict[str, Recorded], recorded_by: str) -> None:
        """Called by the wake step and the sweeper with the plans they recorded."""
        self.decided_here.add(outcomes)
        self.put([final_event(plan, o.reason, o.wait_ms, recorded_by) for plan, o in outcomes.items()],
                 FINAL_STATE_DELAY_S)

    def looked(self, plan_id: str, outcome: Recorded) -> None:
        """Called from a task thread with the plan its look recorded (its RETRY, if any, left a look ago)."""
        self.put([final_event(plan_id, outcome.reason, outcome.wait_ms, "look")], 0.0)

    def put(self, events: list[tuple[str, dict[str, Any]]], delay: float) -> None:
        now, wall = time.monotonic(), time.time()  # the event's timestamp: when it was decided, not when sent
        with self.cond:
            self.pending.extend(Kept(now + delay, now, type_, {**fields, "timestamp": wall})
                                for type_, fields in events)
            overflow = max(0, len(self.pending) - OUTBOX_MAX)
            for _ in range(overflow):
                self.pending.popleft()
            self.dropped += overflow
            first_drop, self.full = overflow and not self.full, self.full or bool(overflow)
            self.cond.notify()
        if first_drop:  # once per outage (flush resets it)
            log.warning("P2.8A.3: task events for Flower dropped, oldest first: %d already wait for the broker",
                        OUTBOX_MAX)

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()

    def run(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and (wait := self.wait_s()) != 0.0:
                    self.cond.wait(wait)
                if self.stopping:
                    break
            self.flush(time.monotonic())
        self.flush(float("inf"))  # at exit: whatever is left, once, whatever its delay
        self.close()
        if self.pending:
            log.warning("P2.8A.3: %d task event(s) for Flower not sent before exit", len(self.pending))

    def wait_s(self) -> float | None:
        """How long until there is something to send (None: until woken)."""
        if not self.pending:
            return None
        return max(0.0, self.pending[0].due - time.monotonic(), self.retry_at - time.monotonic())

    def flush(self, now: float) -> None:
        """Send the events due by ``now``, oldest first; on a failure keep the rest for EVENTS_RETRY_S."""
        fresh_retry = self.dispatcher is not None  # a connection idle for long may be stale: one fresh try at once
        sent = self.sent
        while True:
            with self.cond:
                if not self.pending or self.pending[0].due > now:
                    break
                event = self.pending[0]
            fresh = time.monotonic() - event.at <= EVENTS_KEEP_S
            if fresh:
                try:
                    self.publish(event)
                except Exception as exc:  # kombu wraps broker failures in many types
                    self.close()
                    if fresh_retry:
                        fresh_retry = False
                        continue
                    self.failed(exc)
                    return
                self.sent += 1
            with self.cond:
                self.dropped += not fresh
                if self.pending and self.pending[0] is event:  # (unless dropped meanwhile by put's bound)
                    self.pending.popleft()
        if self.failing_since is not None and self.sent > sent:
            self.full = False
            log.warning("P2.8A.3: task events for Flower sent again after %.1fs without the broker (%d dropped so "
                        "far)", time.monotonic() - self.failing_since, self.dropped)
            self.failing_since = None

    def publish(self, event: Kept) -> None:
        if self.dispatcher is None:
            self.connection = self.app.connection_for_write()
            self.dispatcher = self.app.events.Dispatcher(self.connection, hostname=self.hostname,
                                                         buffer_while_offline=False)
        self.dispatcher.send(event.type, retry=False, **event.fields)

    def failed(self, exc: BaseException) -> None:
        self.retry_at = time.monotonic() + EVENTS_RETRY_S
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            log.warning("P2.8A.3: task events for Flower not sent (%s); %d kept, sent again when the broker takes "
                        "them (for up to %.0fs)", describe(exc), len(self.pending), EVENTS_KEEP_S)

    def close(self) -> None:
        dispatcher, connection, self.dispatcher, self.connection = self.dispatcher, None, None, None
        for thing in (dispatcher, connection):
            if thing is not None:
                with contextlib.suppress(Exception):  # closing a dead connection may fail in many ways
                    thing.close()
