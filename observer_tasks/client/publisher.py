"""The background publisher: observe_late's first messages leave the caller's path here.

One daemon thread per process drains a bounded queue and publishes what it
finds through ONE kombu connection and producer (short timeouts, no retries),
so the caller pays only the admission round trip. Each message still goes
through Celery's ``apply_async``, so Flower and exporters see exactly one
task-sent event per plan on queue late_obs, as before.

The lease taken at admission is what makes this safe: a message that is never
sent (queue full, broker down, the process killed before the thread got to
it) leaves its lease in the ledger, and the worker's sweeper records the plan
at deadline + grace. The cause is noted best-effort in Redis
(``Store.note_unsent``) so the sweeper can put it into debug_json.

The same thread pays the refusal counts the callers owe Redis, so a refusal
costs the caller no round trip, and ``close`` (run at interpreter exit) flushes
both within a bounded time.

Fork safety: a Publisher belongs to the process that built it (``pid``). The
thread does not survive ``fork()``, and its locks may have been held at that
moment, so the child must never touch it: producer.py builds a new one there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from ..core.app import app
from ..core.messages import LATE_OBSERVE, LateMessage

log = logging.getLogger("observer_tasks")

#: Messages waiting for the thread; beyond this the plan is left to the sweeper.
QUEUE_MAX = 10_000
#: Messages published per pass of the thread before it looks at its debts.
BATCH_MAX = 500
#: Socket timeout of the publisher's broker connection (s): off the caller's path, but bounds the exit flush.
PUBLISH_TIMEOUT_S = 0.25
#: How often unpaid debts (refusal counts, unsent notes) are retried while Redis is unreachable (s).
DEBT_RETRY_S = 1.0
#: The exit flush gives up after this long (s); what is left is the sweeper's.
EXIT_FLUSH_S = 0.9
#: Unsent notes kept while Redis is unreachable (best effort: the sweeper records the plans anyway).
UNSENT_MAX = 10_000
BREAKER_FIRST_OPEN_S = 1.0
BREAKER_MAX_OPEN_S = 30.0
LOG_EVERY_S = 10.0


class Breaker:
    """Opens after a failure, refusing calls at once; lets one call try again when its period ends.

    The period is 1 s, doubling up to 30 s while failures continue. It logs one
    line each time it opens (so one per period during an outage, never a
    traceback), with how many calls it refused since the last line.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self.open_until = 0.0
        self.period = BREAKER_FIRST_OPEN_S
        self.refused = 0
        self.lock = threading.Lock()

    def is_open(self) -> bool:
        return time.monotonic() < self.open_until

    def refuse(self) -> None:
        with self.lock:
            self.refused += 1

    def failed(self, exc: BaseException) -> None:
        with self.lock:
            now = time.monotonic()
            if now < self.open_until:
                return  # another thread's failure already opened it: one line per period
            period, self.open_until = self.period, now + self.period
            self.period = min(self.period * 2, BREAKER_MAX_OPEN_S)
            refused, self.refused = self.refused, 0
        more = f"; {refused} call(s) refused since the last report" if refused else ""
        log.warning("P2.8A observer: %s unavailable (%.200r); refusing calls for %.0fs%s", self.what, exc, period, more)

    def succeeded(self) -> None:
        self.period = BREAKER_FIRST_OPEN_S


class ThrottledLog:
    """Logs a problem at most once per LOG_EVERY_S, with how many were not logged."""

    def __init__(self) -> None:
        self.last = -LOG_EVERY_S
        self.quiet = 0
        self.lock = threading.Lock()

    def warning(self, message: str) -> None:
        with self.lock:
            now = time.monotonic()
            if now - self.last < LOG_EVERY_S:
                self.quiet += 1
                return
            suffix = f" ({self.quiet} more since the last report)" if self.quiet else ""
            self.last, self.quiet = now, 0
        log.warning("P2.8A observer: %s%s", message, suffix)


class Publisher:
    """A queue and the thread that empties it; built lazily, one per process."""

    def __init__(self, store: Any, broker_breaker: Breaker, redis_failures: tuple[type[BaseException], ...],
                 connection_factory: Callable[[], Any]) -> None:
        self.pid = os.getpid()
        self.store = store
        self.breaker = broker_breaker
        self.redis_failures = redis_failures
        self.app = app
        self.connection_factory = connection_factory
        self.problems = ThrottledLog()
        self.cond = threading.Condition(threading.Lock())  # guards everything below
        self.queue: deque[LateMessage] = deque()
        self.owed: Counter[str] = Counter()
        self.unsent: dict[str, str] = {}
        self.retry_at = 0.0  # monotonic time of the next attempt to pay debts after a Redis failure
        self.stopping = False
        self.thread: threading.Thread | None = None
        # Broker objects: used by the thread only.
        self.connection: Any = None
        self.producer: Any = None
        self.dispatcher: Any = None

    # -- called from any thread of the owning process ------------------------------
    def submit(self, message: LateMessage) -> bool:
        """Queue the message; False (the plan left to the sweeper) when the queue is full."""
        with self.cond:
            if len(self.queue) >= QUEUE_MAX:
                self._note_locked([message.plan_id], "publisher queue full")
                return False
            self.queue.append(message)
            self._wake_locked()
        return True

    def owe(self, field: str) -> None:
        """Count a refusal; the thread writes it to Redis."""
        with self.cond:
            self.owed[field] += 1
            self._wake_locked()

    def close(self, timeout: float = EXIT_FLUSH_S) -> None:
        """Flush the queue and the debts, then stop: at most ``timeout`` seconds."""
        if os.getpid() != self.pid:
            return  # an inherited copy: its thread and connections are the parent's
        deadline = time.monotonic() + timeout
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
            thread = self.thread
        if thread is not None and thread.is_alive():
            thread.join(max(0.0, deadline - time.monotonic()))
        elif self._pending():
            self._work(deadline)  # no thread was needed yet (or it cannot start): flush here
        with self.cond:
            left = [m.plan_id for m in self.queue]
            self.queue.clear()
        if left:  # the thread ran out of time; leases stay for the sweeper
            self._note(left, "process exited before the message was sent")
            log.warning("P2.8A observer: %d late message(s) not sent before exit; the sweeper will record them",
                        len(left))
        if thread is None or not thread.is_alive():
            self._drop_connection()

    # -- the thread ------------------------------------------------------------------
    def _wake_locked(self) -> None:
        if self.thread is None and not self.stopping:
            self.thread = threading.Thread(target=self._run, name="p28-publisher", daemon=True)
            self.thread.start()
        self.cond.notify()

    def _pending(self) -> bool:
        return bool(self.queue or self.owed or self.unsent)

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.stopping:
                    debts = self.owed or self.unsent
                    if debts and time.monotonic() >= self.retry_at:
                        break
                    self.cond.wait(DEBT_RETRY_S if debts else None)
                if self.stopping and not self._pending():
                    return
            if self.stopping:
                self._work(time.monotonic() + EXIT_FLUSH_S)
                return
            try:
                self._work(None)
            except Exception:  # a bug here must not kill the thread: the sweeper covers the plans
                log.exception("P2.8A observer: unexpected error in the late publisher")

    def _work(self, deadline: float | None) -> None:
        """Publish what is queued, then pay debts; with a deadline, until done or out of time."""
        while True:
            with self.cond:
                batch = [self.queue.popleft() for _ in range(min(BATCH_MAX, len(self.queue)))]
            if batch:
                self._publish(batch)
            self._pay_debts()
            with self.cond:
                done = not self.queue
            if done or deadline is None or time.monotonic() > deadline:
                return

    def _publish(self, batch: list[LateMessage]) -> None:
        if self.breaker.is_open():
            self._note([m.plan_id for m in batch], "broker unavailable (circuit open)")
            return
        # A connection that worked before may have gone stale while idle (the server closed it): one fresh
        # connection gets a second try before the broker counts as down.
        fresh_retry = self.producer is not None
        sent = 0
        while True:
            try:
                producer, dispatcher = self._broker()
                for message in batch[sent:]:
                    self.app.send_task(LATE_OBSERVE, args=message.args(), producer=producer,
                                       event_dispatcher=dispatcher, retry=False, task_id=f"p28-late-{message.plan_id}")
                    sent += 1
            except Exception as exc:  # kombu wraps broker failures in many types
                self._drop_connection()  # reconnect from scratch next time
                if fresh_retry:
                    fresh_retry = False
                    continue
                self._note([m.plan_id for m in batch[sent:]], f"broker unavailable: {exc!r:.160}")
                self.breaker.failed(exc)
                return
            self.breaker.succeeded()
            return

    def _broker(self) -> tuple[Any, Any]:
        if self.producer is None:
            self.connection = self.connection_factory()
            # The app's default dispatcher is shared by every thread and buffers events while offline;
            # this one is the process's own, raises on failure, and carries this process's pid.
            self.dispatcher = self.app.events.Dispatcher(self.connection, enabled=False, buffer_while_offline=False)
            self.producer = self.app.amqp.Producer(self.connection, auto_declare=False)
        return self.producer, self.dispatcher

    def _drop_connection(self) -> None:
        connection, self.connection, self.producer, self.dispatcher = self.connection, None, None, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.release()

    # -- debts to Redis ------------------------------------------------------------
    def _note_locked(self, plan_ids: list[str], cause: str) -> None:
        for plan_id in plan_ids:
            if len(self.unsent) < UNSENT_MAX:
                self.unsent[plan_id] = cause

    def _note(self, plan_ids: list[str], cause: str) -> None:
        with self.cond:
            self._note_locked(plan_ids, cause)

    def _pay_debts(self) -> None:
        with self.cond:
            if time.monotonic() < self.retry_at:
                return
            owed, self.owed = self.owed, Counter()
            unsent, self.unsent = self.unsent, {}
        try:
            if owed:
                self.store.add_counts(dict(owed))
                owed = Counter()
            by_cause: dict[str, list[str]] = {}
            for plan_id, cause in unsent.items():
                by_cause.setdefault(cause, []).append(plan_id)
            for cause, plan_ids in by_cause.items():
                self.store.note_unsent(plan_ids, cause)  # best effort: only a debug_json cause
                self.problems.warning(f"{len(plan_ids)} late message(s) not sent ({cause}); "
                                      "the sweeper will record them")
            unsent = {}
        except self.redis_failures as exc:
            with self.cond:
                self.owed.update(owed)
                for plan_id, cause in unsent.items():
                    self.unsent.setdefault(plan_id, cause)
                self.retry_at = time.monotonic() + DEBT_RETRY_S
            log.debug("P2.8A observer: cannot pay debts to Redis yet (%r)", exc)
