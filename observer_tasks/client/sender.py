"""The first messages: each admitted plan's `late_observe`, sent by the outbox thread through one broker connection.

Each message still goes through Celery's ``send_task``, which builds its task-sent event; the sender takes that
event instead of letting Celery publish it (``SentEvent``), adds the plan's publish time as ``received`` (Flower's
task list sorts by it: the newest plans first) and publishes it right after the message, so Flower and exporters
see exactly one task-sent per plan on queue late_obs, with the task's name, args, queue and routing key. Plans the
admission recorded at once get their task-sent and their final event from here too. An event the broker refuses
is kept (at most OUTBOX_MAX, for EVENTS_KEEP_S) and sent again, oldest first, once it takes them; kept events never
hold a message back.

The lease taken at admission is what makes the messages safe: a message that is never sent (queue full, broker
down, the process killed first) leaves its lease in the ledger, and the worker's sweeper decides the plan at
deadline + grace; the cause is noted (the outbox writes the note) for its debug_json.

The first look runs one safety interval after the admission while the wake path is healthy (the wake step
records most plans before then; a look at once would only find them waiting), at once otherwise. Its eta is on
Redis's clock (the admission's publish time), so a skewed apply host cannot delay it. The wake path's health is
the key the workers' heartbeats keep (contract.WAKE), read at most once per WAKE_HEALTH_READ_S on a client with
the callers' short timeout, so a slow Redis never holds the messages back (no answer: "not healthy").
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from ..core import contract as C
from ..core.connections import describe
from ..core.ledger import Recorded
from ..core.messages import LATE_OBSERVE, LateMessage, final_event, task_sent
from ..core.settings import Settings
from ..core.timings import (
    BROKER_PATIENCE_S,
    EVENTS_KEEP_S,
    EVENTS_RETRY_S,
    OUTBOX_BATCH,
    OUTBOX_MAX,
    WAKE_HEALTH_READ_S,
)
from .resilience import Breaker, ThrottledLog, backoff


class SentEvent:
    """Given to ``send_task`` as its event dispatcher: keeps the task-sent event Celery built (its fields, exactly as
    Celery publishes them) instead of publishing it."""

    fields: dict[str, Any] | None = None

    def publish(self, type_: str, fields: dict[str, Any], producer: Any, **_options: Any) -> None:
        self.fields = fields


class Sender:
    """Queued first messages and the broker connection; the queue is guarded by the caller's ``lock``."""

    def __init__(self, app: Any, settings: Settings, connect: Callable[[], Any], health: Callable[[], Any],
                 note: Callable[[list[str], str], None], breaker: Breaker,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.app, self.settings, self.connect, self.health, self.note = app, settings, connect, health, note
        self.breaker, self.clock = breaker, clock
        self.queue: deque[LateMessage] = deque()
        #: Task events not yet published, oldest first: (when kept, type, fields); filled by the caller's thread
        #: (plans the admission recorded) and the outbox thread, hence their own lock.
        self.events: deque[tuple[float, str, dict[str, Any]]] = deque()
        self.events_lock = threading.Lock()
        self.events_at, self.events_dropped = 0.0, 0
        self.send_at = 0.0
        self.failing_since: float | None = None
        self.wake_healthy, self.health_read_at = False, -WAKE_HEALTH_READ_S
        self.connection: Any = None
        self.producer: Any = None
        self.dispatcher: Any = None
        self.problems = ThrottledLog(clock)

    def submit(self, message: LateMessage) -> bool:
        """Queue a first message; False (the plan left to the sweeper, noted) when the queue is full."""
        if len(self.queue) >= OUTBOX_MAX:
            self.note([message.plan_id], "first-message queue full")
            return False
        self.queue.append(message)
        return True

    def submit_recorded(self, message: LateMessage, outcome: Recorded) -> None:
        """A plan the admission recorded at once: no message, but its task's task-sent and final event, so that
        Flower and exporters see one task per plan whoever decided it."""
        self.keep(("task-sent", task_sent(message)),
                  final_event(message.plan_id, outcome.reason, outcome.wait_ms, "admit"))

    def keep(self, *events: tuple[str, dict[str, Any]]) -> None:
        """Queue events for publishing (stamped now: a late one still says when it happened); beyond OUTBOX_MAX
        the oldest are dropped."""
        now, wall, dropped = self.clock(), time.time(), 0
        with self.events_lock:
            self.events.extend((now, type_, {**fields, "timestamp": wall}) for type_, fields in events)
            while len(self.events) > OUTBOX_MAX:
                self.events.popleft()
                dropped += 1
            self.events_dropped += dropped
        if dropped:
            self.problems.warning(f"task events dropped: {OUTBOX_MAX} already wait for the broker "
                                  f"({self.events_dropped} dropped so far)")

    def due(self) -> float | None:
        dues = [self.send_at] if self.queue else []
        if self.events:  # not while the broker's breaker is open (nothing would be tried before it closes)
            dues.append(max(self.events_at, self.breaker.open_until))
        return min(dues) if dues else None

    def run_once(self, stopping: bool = False) -> None:
        if self.events and self.clock() >= self.events_at and not self.breaker.is_open():
            self.send_events()
        if not self.queue or self.clock() < self.send_at:
            return
        batch = [self.queue.popleft() for _ in range(min(OUTBOX_BATCH, len(self.queue)))]
        if self.breaker.is_open():
            self.note([m.plan_id for m in batch], "broker unavailable (circuit open)")
            return
        # A connection that worked may have gone stale while idle (the server closed it): one fresh connection
        # gets a second try at once.
        fresh_retry, sent = self.producer is not None, 0
        while True:
            try:
                producer, dispatcher = self.broker()
                for message in batch[sent:]:
                    event = SentEvent()
                    self.app.send_task(LATE_OBSERVE, args=message.args(), producer=producer,
                                       kwargs=message.kwargs() if message.errors else None,
                                       event_dispatcher=event, retry=False, task_id=C.task_id(message.plan_id),
                                       eta=self.first_look_at(message))
                    sent += 1
                    # Right after its message, as Celery would (the first look's RETRY must not overtake it). One
                    # the broker refuses is kept, and the messages not sent yet are retried as after any failure.
                    fields = task_sent(message, event.fields)
                    try:
                        dispatcher.publish("task-sent", fields, producer)
                    except Exception:
                        self.keep(("task-sent", fields))
                        raise
            except Exception as exc:  # kombu wraps broker failures in many types
                self.drop_connection()
                if fresh_retry:
                    fresh_retry = False
                    continue
                self.failed(batch[sent:], exc, stopping)
                return
            if self.failing_since is not None:
                self.problems.warning(f"broker answers again after {self.clock() - self.failing_since:.1f}s")
            self.failing_since = None
            self.breaker.close()
            return

    def send_events(self) -> None:
        fresh_retry = self.producer is not None  # a connection idle for long may be stale: one fresh try at once
        while True:
            try:
                producer, dispatcher = self.broker()
                self.publish_events(producer, dispatcher)
                return
            except Exception as exc:  # kombu wraps broker failures in many types
                self.drop_connection()
                if fresh_retry:
                    fresh_retry = False
                    continue
                self.events_at = self.clock() + EVENTS_RETRY_S
                self.problems.warning(f"task events not sent ({describe(exc)}); {len(self.events)} kept, sent again "
                                      f"when the broker takes them (for up to {EVENTS_KEEP_S:.0f}s)")
                return

    def publish_events(self, producer: Any, dispatcher: Any) -> None:
        """Publish the kept events, oldest first (one older than EVENTS_KEEP_S is dropped); raises on the first the
        broker refuses, which stays first."""
        while True:
            with self.events_lock:
                if not self.events:
                    return
                head = self.events[0]
            if self.clock() - head[0] <= EVENTS_KEEP_S:
                dispatcher.publish(head[1], head[2], producer)
            else:
                self.events_dropped += 1
                self.problems.warning(f"task events older than {EVENTS_KEEP_S:.0f}s dropped "
                                      f"({self.events_dropped} dropped so far)")
            with self.events_lock:
                if self.events and self.events[0] is head:  # (unless dropped meanwhile by keep's bound)
                    self.events.popleft()

    def failed(self, unsent: list[LateMessage], exc: BaseException, stopping: bool) -> None:
        """Keep the messages and try again soon; once the broker has failed for BROKER_PATIENCE_S (or at exit),
        leave them, and every message while the breaker is open, to the sweeper, with the cause."""
        now = self.clock()
        if self.failing_since is None:
            self.failing_since = now
            self.problems.warning(f"broker slow or refusing ({describe(exc)}); {len(unsent)} message(s) retried "
                                  f"for up to {BROKER_PATIENCE_S:g}s")
        if now - self.failing_since < BROKER_PATIENCE_S and not stopping:
            self.queue.extendleft(reversed(unsent))
            self.send_at = now + backoff(now - self.failing_since)
            return
        self.note([m.plan_id for m in unsent], f"broker unavailable: {exc!r:.160}")
        self.breaker.failed(exc)

    def first_look_at(self, message: LateMessage) -> datetime | None:
        """One safety interval after the admission (Redis's clock) while the wake path is healthy; else now."""
        now = self.clock()
        if self.settings.late_obs_wake and now >= self.health_read_at + WAKE_HEALTH_READ_S:
            self.health_read_at = now
            try:
                self.wake_healthy = bool(self.health().exists(C.WAKE))
            except Exception:  # a Redis that cannot answer now: not healthy, the first look runs at once
                self.wake_healthy = False
        if not (self.wake_healthy and self.settings.late_obs_wake):
            return None
        window = message.deadline_ms - message.published_ms
        first_ms = message.published_ms + min(self.settings.safety_poll_ms, window)
        return datetime.fromtimestamp(first_ms / 1000, tz=UTC)

    def broker(self) -> tuple[Any, Any]:
        if self.producer is None:
            self.connection = self.connect()
            # The app's default dispatcher is shared by every thread and buffers events while offline; this one
            # is the process's own, raises on failure, and carries this process's pid.
            self.dispatcher = self.app.events.Dispatcher(self.connection, enabled=False, buffer_while_offline=False)
            self.producer = self.app.amqp.Producer(self.connection, auto_declare=False)
        return self.producer, self.dispatcher

    def drop_connection(self) -> None:
        connection, self.connection, self.producer, self.dispatcher = self.connection, None, None, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.release()

    def give_up(self) -> list[str]:
        """At exit: one last try for the kept events, and the plans whose message is still queued (their leases
        stay for the sweeper)."""
        if self.events and self.clock() >= self.events_at and not self.breaker.is_open():  # (not if just failed)
            self.send_events()
        if self.events:
            self.problems.warning(f"{len(self.events)} task event(s) not sent before exit")
        left = [m.plan_id for m in self.queue]
        self.queue.clear()
        return left
