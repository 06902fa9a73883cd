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

The same thread carries the calls the callers could not make while Redis was
slow (a long script, a fork, a failover's first second): a caller whose one
round trip failed, and every caller after it until the thread has caught up,
hands its call over here (``defer``) and returns at once. The thread replays
them in pipelines on its own connection, with a longer timeout, once Redis
answers: the early observation with how late it is in debug_json, the
admission with its publish time moved back by the time the call waited (the
one duration measured on the host, by its monotonic clock) and the call's
token, so an admission whose reply was lost finds its own lease instead of
being a duplicate whose message is never sent. Only when Redis has not
answered for DEFER_PATIENCE_S does the Redis breaker open (callers refuse at
once, counted); a deferred call older than that is counted as refused, once:
one that was sent and whose reply was lost is first settled in Redis
(``Store.settle``), so it is never both recorded and counted. Broker sends are
retried the same way before their plans are left to the sweeper.

The same thread pays the refusal counts the callers owe Redis, so a refusal
costs the caller no round trip, and ``close`` (run at interpreter exit) flushes
all of it within a bounded time.

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
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis

from ..core import keys as K
from ..core.app import app
from ..core.messages import LATE_OBSERVE, LateMessage
from ..core.settings import CALL_TIMEOUT_S
from ..core.store import admission, is_access_refused, redis_client

log = logging.getLogger("observer_tasks")

#: How often the thread reads the wake path's health for the first looks' countdown (s).
WAKE_HEALTH_READ_S = 1.0
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
#: A Redis or broker stall shorter than this costs latency, not observations: deferred calls and unsent
#: messages are retried for this long (s) before the breaker opens and they are counted / left to the sweeper.
#: Above the 1 s the observer promises to ride out (issue 19), below MAX_WAIT_MS's default.
DEFER_PATIENCE_S = 2.0
#: Calls waiting for Redis in the thread at most; beyond it a call is refused (counted) at once.
DEFER_MAX = 10_000
#: After the thread has caught up, calls keep going through it for this long (s): a Redis just out of a stall
#: is busy with every client's backlog, and a caller must not pay the cap again for that.
HOLD_S = 0.5
#: Socket timeout of the thread's own Redis connection (s): a stall up to this long is simply waited out.
REPLAY_TIMEOUT_S = 1.0
#: After a failed replay or send, the thread tries again after this (s), doubling up to RETRY_MAX_S while the
#: failures last: a stall's end is seen within tens of ms, a dead service is not hammered.
RETRY_S = 0.05
RETRY_MAX_S = 0.4
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
        log.warning("P2.8A observer: %s unavailable (%s); refusing calls for %.0fs%s", self.what, describe(exc),
                    period, more)

    def succeeded(self) -> None:
        self.period = BREAKER_FIRST_OPEN_S

    def close(self) -> None:
        """The thread reached the service again: callers may try at once."""
        with self.lock:
            self.open_until, self.period = 0.0, BREAKER_FIRST_OPEN_S


def backoff(failing_for: float) -> float:
    """The wait before the next attempt: RETRY_S, doubling with every RETRY_S-long stretch of failing."""
    return min(RETRY_MAX_S, max(RETRY_S, failing_for))


def describe(exc: BaseException) -> str:
    """One short line for a failure: its type and message (a pipeline's error names its command first)."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    return f"{type(cause).__name__}: {str(cause).split(' of pipeline caused error: ')[-1]}"[:200]


class ThrottledLog:
    """Logs a problem at most once per LOG_EVERY_S, with how many were not logged."""

    def __init__(self) -> None:
        self.last = -LOG_EVERY_S
        self.quiet = 0
        self.lock = threading.Lock()

    def warning(self, message: str, exc_info: bool = False) -> None:
        """Log at most one line per period; with exc_info, the traceback too (so at most one per period)."""
        with self.lock:
            now = time.monotonic()
            if now - self.last < LOG_EVERY_S:
                self.quiet += 1
                return
            suffix = f" ({self.quiet} more since the last report)" if self.quiet else ""
            self.last, self.quiet = now, 0
        log.warning("P2.8A observer: %s%s", message, suffix, exc_info=exc_info)


@dataclass
class Deferred:
    """A call handed to the thread because Redis was slow: what to replay, since when, and whether an attempt
    was sent (its reply lost: it may have been done, so it is settled rather than simply counted)."""

    obs_point: str
    plan_id: str
    symbol: str
    apply_decision: str
    token: str
    since: float  # monotonic time of the call
    attempted: bool = False


#: Replies that mean Redis did not run the call and will soon (a script or load under way, a failover): the
#: call is deferred and retried. Any other error reply is refused at once.
TRANSIENT_REPLIES = ("BUSY", "LOADING", "TRYAGAIN", "MASTERDOWN", "READONLY", "CLUSTERDOWN", "NOREPLICAS")


def transient(exc: BaseException) -> bool:
    """A failure worth waiting out: a timeout, a lost connection, or a reply saying 'not now'."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    if is_access_refused(cause):  # a configuration error (NOPERM, NOAUTH, WRONGPASS): waiting fixes nothing
        return False
    if isinstance(cause, redis.ResponseError):
        code = getattr(cause, "status_code", None) or str(cause).split(" ", 1)[0]
        return str(code).upper() in TRANSIENT_REPLIES
    return isinstance(cause, redis.ConnectionError | redis.TimeoutError | OSError)


class Publisher:
    """A queue and the thread that empties it; built lazily, one per process."""

    def __init__(self, store: Any, broker_breaker: Breaker, redis_failures: tuple[type[BaseException], ...],
                 connection_factory: Callable[[], Any], redis_breaker: Breaker | None = None) -> None:
        self.pid = os.getpid()
        self.store = store  # the thread's own: REPLAY_TIMEOUT_S, never the callers' 50 ms client
        self.breaker = broker_breaker
        self.redis_breaker = redis_breaker or Breaker("Redis")
        self.redis_failures = redis_failures
        self.app = app
        self.connection_factory = connection_factory
        self.problems = ThrottledLog()
        self.recoveries = ThrottledLog()
        self.cond = threading.Condition(threading.Lock())  # guards everything below
        self.queue: deque[tuple[float, LateMessage]] = deque()  # (monotonic time queued, message)
        self.deferred: deque[Deferred] = deque()
        self.owed: Counter[str] = Counter()
        self.unsent: dict[str, str] = {}
        self.retry_at = 0.0  # monotonic time of the next attempt to pay debts after a Redis failure
        self.replay_at = 0.0  # ... to replay deferred calls after a failure
        self.publish_at = 0.0  # ... to send queued messages after a broker failure
        self.redis_failing_since: float | None = None
        self.hold_until = 0.0  # monotonic time until which callers keep deferring after a stall
        self.stalled = False  # a call met a slow Redis since the last drain: the drain starts a hold
        self.broker_failing_since: float | None = None
        self.wake_healthy = False
        self.health_read_at = -WAKE_HEALTH_READ_S
        self.health_client: Any = None  # the thread's only: see _first_look_at
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
            self.queue.append((time.monotonic(), message))
            self._wake_locked()
        return True

    @property
    def deferring(self) -> bool:
        """True while calls wait for Redis here (and HOLD_S after): later calls join them rather than try Redis."""
        return bool(self.deferred) or time.monotonic() < self.hold_until

    def defer(self, call: Deferred) -> bool:
        """Hand a call to the thread; False (refused, counted) when DEFER_MAX calls already wait."""
        with self.cond:
            self.stalled = self.stalled or call.attempted  # (its own attempt failed: Redis is slow)
            if len(self.deferred) >= DEFER_MAX:
                self.owed[K.Keys.refused_field(call.obs_point, "unavailable")] += 1
                self._wake_locked()
                return False
            self.deferred.append(call)
            self._wake_locked()
        return True

    def owe(self, field: str) -> None:
        """Count a refusal; the thread writes it to Redis."""
        with self.cond:
            self.owed[field] += 1
            self._wake_locked()

    def close(self, timeout: float = EXIT_FLUSH_S) -> None:
        """Flush the deferred calls, the queue and the debts, then stop: at most ``timeout`` seconds."""
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
            left = [m.plan_id for _, m in self.queue]
            self.queue.clear()
            unknown = sum(c.attempted for c in self.deferred)
            for c in self.deferred:
                if not c.attempted:
                    self.owed[K.Keys.refused_field(c.obs_point, "unavailable")] += 1
            self.deferred.clear()
        if left:  # the thread ran out of time; leases stay for the sweeper
            self._note(left, "process exited before the message was sent")
            log.warning("P2.8A observer: %d late message(s) not sent before exit; the sweeper will record them",
                        len(left))
        if unknown:
            log.warning("P2.8A observer: %d call(s) sent to Redis whose reply never came before exit: "
                        "each was recorded or admitted by Redis, or not at all", unknown)
        if thread is None or not thread.is_alive():
            with contextlib.suppress(*self.redis_failures):
                self._pay_debts()
            self._drop_connection()

    # -- the thread ------------------------------------------------------------------
    def _wake_locked(self) -> None:
        if self.thread is None and not self.stopping:
            self.thread = threading.Thread(target=self._run, name="p28-publisher", daemon=True)
            self.thread.start()
        self.cond.notify()

    def _pending(self) -> bool:
        return bool(self.queue or self.owed or self.unsent or self.deferred)

    def _next_due_locked(self) -> float | None:
        """Monotonic time at which the thread has work, or None when it has none."""
        times = []
        if self.deferred:
            times.append(self.replay_at)
        if self.queue:
            times.append(self.publish_at)
        if self.owed or self.unsent:
            times.append(self.retry_at)
        return min(times) if times else None

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.stopping:
                    due = self._next_due_locked()
                    if due is not None and due <= time.monotonic():
                        break
                    self.cond.wait(None if due is None else due - time.monotonic())
                if self.stopping and not self._pending():
                    return
            try:
                if self.stopping:
                    self._work(time.monotonic() + EXIT_FLUSH_S)
                    return
                self._work(None)
            except Exception:  # a bug here must not kill the thread: the sweeper covers the plans
                self.problems.warning("unexpected error in the late publisher", exc_info=True)

    def _work(self, deadline: float | None) -> None:
        """Replay deferred calls, publish what is queued, pay debts; with a deadline, until done or out of time."""
        while True:
            self._replay()
            self._publish_queued()
            self._pay_debts()
            with self.cond:
                if not self._pending() or deadline is None:
                    return
                now, due = time.monotonic(), self._next_due_locked()
                if now > deadline:
                    return
                if due is not None and due > now:
                    self.cond.wait(min(due, deadline) - now)

    # -- deferred calls (Redis was slow) --------------------------------------------
    def _replay(self) -> None:
        now = time.monotonic()
        with self.cond:
            if not self.deferred or now < self.replay_at:
                return
            batch = [self.deferred[i] for i in range(min(BATCH_MAX, len(self.deferred)))]
        # Only a call sent to a Redis that then stopped answering for the whole patience is settled instead of
        # replayed (the others too old by then were counted when it failed): a busy thread ages nothing out.
        expired = [c for c in batch if c.attempted and now - c.since > DEFER_PATIENCE_S]
        live = [c for c in batch if not (c.attempted and now - c.since > DEFER_PATIENCE_S)]
        try:
            if self.redis_failing_since is not None:
                self.store.client.ping()  # no call is sent (and left in doubt) until Redis answers again
        except self.redis_failures as exc:
            self._replay_failed(exc, now)
            return
        try:
            replies = self._send_replays(live, now)
            settled = self.store.settle([(c.obs_point, c.plan_id, c.token) for c in expired])
        except self.redis_failures as exc:
            for c in live:
                c.attempted = True  # sent, reply lost: Redis may have done it (a retry or settle will tell)
            if is_access_refused(exc.__cause__ or exc):  # refused for this user: counted, never retried
                self._refuse_all(batch, "config_error", exc)
                return
            self._replay_failed(exc, now)
            return
        retry: list[Deferred] = []
        for call, reply in zip(live, replies, strict=True):
            if isinstance(reply, BaseException):
                if transient(reply):  # refused before it ran (BUSY, LOADING, READONLY): simply try again
                    retry.append(call)
                    first_refusal = reply
                else:  # Redis refused it for good (a script error, permissions): counted, never retried
                    cause = "config_error" if is_access_refused(reply) else "unavailable"
                    self.owe(K.Keys.refused_field(call.obs_point, cause))
                    self.problems.warning(f"deferred {call.obs_point} call refused by Redis: {describe(reply)}")
            elif call.obs_point == K.OBS_LATE:
                self._admitted(call, admission(reply))
        for call, outcome in zip(expired, settled, strict=True):
            self._admitted(call, outcome)
        with self.cond:
            for _ in batch:
                if self.deferred:  # (close() may have cleared it at exit)
                    self.deferred.popleft()
            self.deferred.extendleft(reversed(retry))
            drained = not self.deferred
            if drained and not retry and self.stalled:  # the end of a stall (not of its hold, nor a busy spell)
                self.hold_until, self.stalled = time.monotonic() + HOLD_S, False
        if retry:
            self._replay_failed(first_refusal, now)
            return
        if self.redis_failing_since is not None or drained:
            self.redis_breaker.close()
        if self.redis_failing_since is not None:
            self.recoveries.warning(f"Redis answers again after {now - self.redis_failing_since:.1f}s; "
                                    "deferred calls replayed")
        self.redis_failing_since = None

    def _refuse_all(self, batch: list[Deferred], cause: str, exc: BaseException) -> None:
        with self.cond:
            for call in batch:
                if self.deferred:
                    self.deferred.popleft()
                self.owed[K.Keys.refused_field(call.obs_point, cause)] += 1
        self.problems.warning(f"{len(batch)} deferred call(s) refused by Redis: {describe(exc)}")

    def _send_replays(self, calls: list[Deferred], now: float) -> list[Any]:
        """One pipeline: each early call with how late it is, each admission with its age and token."""
        if not calls:
            return []
        pipe = self.store.client.pipeline(transaction=False)
        for c in calls:
            age_ms = int((now - c.since) * 1000)
            if c.obs_point == K.OBS_LATE:
                self.store.admit(c.plan_id, c.symbol, c.apply_decision, c.token, age_ms, client=pipe)
            else:
                self.store.observe_early(c.plan_id, c.symbol, c.apply_decision, {"deferred_ms": age_ms}, client=pipe)
        return list(pipe.execute(raise_on_error=False))

    def _admitted(self, call: Deferred, outcome: Any) -> None:
        """A replayed or settled call's outcome: an admitted plan's first message is queued; a settled call
        that Redis never did is counted as refused; anything else (recorded, duplicate, dropped) is done."""
        if outcome.status == "admitted":
            # Admitted after its whole window had passed (Redis was unavailable longer than MAX_WAIT_MS): nobody
            # could look in time, so the first look records redis_error, as after two failed looks, not timeout.
            waited_out = time.monotonic() - call.since >= self.store.settings.late_obs_max_wait_ms / 1000
            message = LateMessage(call.plan_id, call.symbol, call.apply_decision, outcome.published_ms,
                                  outcome.deadline_ms, errors=2 if waited_out else 0)
            with self.cond:
                self.queue.append((time.monotonic(), message))
        elif outcome.status == "refused":
            self.owe(K.Keys.refused_field(call.obs_point, "unavailable"))

    def _replay_failed(self, exc: BaseException, now: float) -> None:
        """Redis did not answer: try again soon; past DEFER_PATIENCE_S, open the breaker (callers refuse) and
        count the calls that were never sent and are now too old."""
        self.stalled = True
        if self.redis_failing_since is None:
            self.redis_failing_since = now
            self.problems.warning(f"Redis slow or refusing ({describe(exc)}); "
                                  f"{len(self.deferred)} call(s) waiting, retried for up to {DEFER_PATIENCE_S:g}s")
        with self.cond:
            self.replay_at = time.monotonic() + backoff(now - self.redis_failing_since)
            too_old = [c for c in self.deferred if now - c.since > DEFER_PATIENCE_S and not c.attempted]
            if too_old:
                self.deferred = deque(c for c in self.deferred if c.attempted or now - c.since <= DEFER_PATIENCE_S)
                for c in too_old:
                    self.owed[K.Keys.refused_field(c.obs_point, "unavailable")] += 1
        if now - self.redis_failing_since >= DEFER_PATIENCE_S:
            self.redis_breaker.failed(exc)

    # -- first messages -------------------------------------------------------------
    def _publish_queued(self) -> None:
        with self.cond:
            if not self.queue or time.monotonic() < self.publish_at:
                return
            batch = [self.queue.popleft() for _ in range(min(BATCH_MAX, len(self.queue)))]
        self._publish(batch)

    def _first_look_at(self, message: LateMessage) -> datetime | None:
        """When the plan's first look runs: one safety interval after its admission while the wake path is
        healthy, since the wake step records most plans before then and a look at once would only find them
        waiting (its eta then reaches the safety look it would have sent anyway); at once (None) otherwise.

        The eta is on Redis's clock (the admission's publish time, not this host's), so a skewed apply host
        cannot delay the look; the worker runs it by its own clock, as it runs its reschedules. The health is
        the workers' (wake_ok and no wake_degraded, as the looks read it), asked at most once per
        WAKE_HEALTH_READ_S on a client with the callers' short timeout (a slow Redis must not hold the
        messages back); a Redis that cannot answer means "not healthy": the first look runs at once."""
        now = time.monotonic()
        if now >= self.health_read_at + WAKE_HEALTH_READ_S:
            self.health_read_at = now
            try:
                if self.health_client is None:
                    settings = self.store.settings
                    self.health_client = redis_client(settings.redis_url, CALL_TIMEOUT_S, "producer", settings)
                ok, degraded = self.health_client.mget(K.WAKE_OK, K.WAKE_DEGRADED)
                self.wake_healthy = ok is not None and degraded is None
            except self.redis_failures + (redis.RedisError,):
                self.wake_healthy = False
        settings = self.store.settings
        if not (self.wake_healthy and settings.late_obs_wake):
            return None
        first_ms = message.published_ms + min(settings.safety_poll_ms, message.deadline_ms - message.published_ms)
        return datetime.fromtimestamp(first_ms / 1000, tz=UTC)

    def _publish(self, batch: list[tuple[float, LateMessage]]) -> None:
        if self.breaker.is_open():
            self._note([m.plan_id for _, m in batch], "broker unavailable (circuit open)")
            return
        # A connection that worked before may have gone stale while idle (the server closed it): one fresh
        # connection gets a second try at once.
        fresh_retry = self.producer is not None
        sent = 0
        while True:
            try:
                producer, dispatcher = self._broker()
                for _, message in batch[sent:]:
                    self.app.send_task(LATE_OBSERVE, args=message.args(), producer=producer,
                                       kwargs=message.kwargs() if message.errors else None,
                                       event_dispatcher=dispatcher, retry=False, task_id=f"p28-late-{message.plan_id}",
                                       eta=self._first_look_at(message))
                    sent += 1
            except Exception as exc:  # kombu wraps broker failures in many types
                self._drop_connection()  # reconnect from scratch next time
                if fresh_retry:
                    fresh_retry = False
                    continue
                self._send_failed(batch[sent:], exc)
                return
            self._broker_ok()
            return

    def _broker_ok(self) -> None:
        if self.broker_failing_since is not None:
            self.recoveries.warning(f"broker answers again after {time.monotonic() - self.broker_failing_since:.1f}s")
        self.broker_failing_since = None
        self.breaker.succeeded()

    def _send_failed(self, unsent: list[tuple[float, LateMessage]], exc: BaseException) -> None:
        """Keep the messages and try again soon; once the broker has failed for DEFER_PATIENCE_S, leave them
        (and, while the breaker is open, every new one) to the sweeper, with the cause."""
        now = time.monotonic()
        if self.broker_failing_since is None:
            self.broker_failing_since = now
            self.problems.warning(f"broker slow or refusing ({describe(exc)}); {len(unsent)} message(s) retried "
                                  f"for up to {DEFER_PATIENCE_S:g}s")
        if now - self.broker_failing_since < DEFER_PATIENCE_S and not self.stopping:  # (at exit: no time left)
            with self.cond:
                self.queue.extendleft(reversed(unsent))
                self.publish_at = now + backoff(now - self.broker_failing_since)
            return
        self._note([m.plan_id for _, m in unsent], f"broker unavailable: {exc!r:.160}")
        self.breaker.failed(exc)

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
