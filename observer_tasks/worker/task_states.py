"""Each plan's life in Flower and exporters: its task's states, sent as Celery task events.

A plan has one task id, ``p28-late-{plan_id}``, for its first look and every later look. Its events:
task-sent (observe_late's message: PENDING, with the first look's eta), task-retried once if its first look
finds it still waiting (RETRY: Celery's state for a task that will run again; the exception names why and
the next look), and exactly one task-succeeded when it is decided (SUCCESS; result
``{'reason': ..., 'wait_ms': ..., 'recorded_by': ...}`` as in its stream entry; runtime = wait_ms in s),
sent by whoever decided it: the look (from the task), or the wake step or the sweeper (from the worker's
main process, through ``FinalStates``). So Flower shows a waiting plan as waiting and a decided one with its
outcome, and celery-exporter counts one task-succeeded per plan, whichever path decided it.

A RETRY that arrives after the SUCCESS would win in Flower (celery.events.state lets RETRY overwrite any
state), so FinalStates sends its SUCCESS events DELAY_S after the decision: the first look sends its RETRY
within milliseconds of the Redis reply that found the plan waiting, so it is always out first.

Events are best effort: a broker that cannot take one loses it (Flower then shows the plan's last state);
it never delays a look, the wake step or the sweeper.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from typing import Any

from ..core.contract import task_id
from ..core.ledger import Recorded
from ..core.messages import result, succeeded
from ..core.timings import EVENTS_RETRY_S, FINAL_STATE_DELAY_S, OUTBOX_MAX
from .context import Decided

log = logging.getLogger("observer_tasks.worker")


def send(task: Any, type_: str, **fields: Any) -> None:
    """One event for the plan of a running task (its id), from the task; never raises."""
    try:
        task.send_event(type_, retry=False, **fields)
    except Exception as exc:  # kombu wraps broker failures in many types
        log.debug("P2.8A.3: %s event for %s not sent (%r)", type_, task.request.id, exc)


class FinalStates(threading.Thread):
    """Sends the SUCCESS event of the plans the wake step and the sweeper decide, from one thread with its
    own broker connection, so that neither of them waits for the broker."""

    def __init__(self, app: Any, hostname: str, decided: Decided) -> None:
        super().__init__(name="p28-task-states", daemon=True)
        self.app = app
        self.hostname = hostname
        self.decided_here = decided
        self.pending: queue.Queue[tuple[float, str, Recorded, str] | None] = queue.Queue(OUTBOX_MAX)
        self.connection: Any = None
        self.dispatcher: Any = None
        self.down_until = 0.0
        self.dropped = 0

    def decided(self, outcomes: dict[str, Recorded], recorded_by: str) -> None:
        """Called by the wake step and the sweeper with the plans they recorded."""
        due = time.monotonic() + FINAL_STATE_DELAY_S
        self.decided_here.add(outcomes)
        for plan, outcome in outcomes.items():
            try:
                self.pending.put_nowait((due, plan, outcome, recorded_by))
            except queue.Full:
                self.dropped += 1

    def stop(self) -> None:
        self.pending.put(None)

    def run(self) -> None:
        while (item := self.pending.get()) is not None:
            due, plan, outcome, recorded_by = item
            time.sleep(max(0.0, due - time.monotonic()))
            self.publish(plan, outcome, recorded_by)
        self.close()

    def publish(self, plan: str, outcome: Recorded, recorded_by: str) -> None:
        if time.monotonic() < self.down_until:
            self.dropped += 1
            return
        try:
            if self.dispatcher is None:
                self.connection = self.app.connection_for_write()
                self.dispatcher = self.app.events.Dispatcher(self.connection, hostname=self.hostname,
                                                             buffer_while_offline=False)
            self.dispatcher.send("task-succeeded", uuid=task_id(plan), retry=False,
                                 **succeeded(result(outcome.reason, outcome.wait_ms, recorded_by)))
        except Exception as exc:  # kombu wraps broker failures in many types
            self.dropped += 1
            self.down_until = time.monotonic() + EVENTS_RETRY_S
            log.warning("P2.8A.3: task events for Flower not sent (%r); %d dropped so far", exc, self.dropped)
            self.close()

    def close(self) -> None:
        dispatcher, connection, self.dispatcher, self.connection = self.dispatcher, None, None, None
        for thing in (dispatcher, connection):
            if thing is not None:
                with contextlib.suppress(Exception):  # closing a dead connection may fail in many ways
                    thing.close()
