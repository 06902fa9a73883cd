"""The apply process's outbox: what its callers hand over, made by one background thread when Redis can take it.

A caller pays at most one Redis round trip. When that round trip fails for a reason worth waiting out (a
timeout, a lost connection, BUSY, LOADING, a failover's READONLY), the call is handed over here and returns
'deferred'; so does every call after it until the outbox has caught up (and CATCH_UP_S after), so one stall
costs one caller the per-call cap once and every other caller nothing. The thread makes the held calls in
pipelines once Redis answers, however long the outage (ride out): an early look with how late it is (past
RIDE_OUT_S it records redis_error: the look at plan creation could not happen), an admission with its publish
time moved back by its age and its token, so a call whose first attempt's reply was lost finds its own lease
('kept': settled without a second plan). Only what exceeds OUTBOX_MAX, or is still held when the process
exits, is given up, and counted as such (`given_up`).

The same thread pays what the callers owe Redis (refusal counts, notes about unsent first messages), and after
a failure that may have lost writes (a lost connection, a restart, a new master) makes again every call Redis
made since the master was last confirmed, and at least RECHECK_WINDOW_S before the failure: what a failover lost
is made anew, what survived is 'kept'/'duplicate'.
Everything here runs on an injected clock and ledger: its rules are unit-tested without Redis (test_outbox.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from ..core import contract as C
from ..core.connections import describe, failure_kind, may_have_lost_writes
from ..core.ledger import Recorded, admission
from ..core.messages import LateMessage
from ..core.timings import HOLD_S, OUTBOX_BATCH, OUTBOX_MAX, RECHECK_WINDOW_S, RIDE_OUT_S
from .calls import Call, status_of
from .resilience import ThrottledLog, backoff

CATCH_UP_S = HOLD_S
#: Each pass's calls and replies at DEBUG (off by default): what the chaos soak reads when a figure is not zero.
trace = logging.getLogger("observer_tasks.outbox")


class Outbox:
    """Held calls, owed counts and notes, and the recent admissions; guarded by ``lock`` (callers' threads and
    the background thread). ``send`` hands a plan's first message to the sender."""

    def __init__(self, ledger: Any, send: Callable[[LateMessage], Any], wake: Callable[[], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ledger, self.send, self.wake, self.clock = ledger, send, wake, clock
        #: Set by the background thread: the task events of a plan the admission recorded at once (Flower).
        self.recorded: Callable[[LateMessage, Recorded], Any] | None = None
        self.lock = threading.Lock()
        self.calls: deque[Call] = deque()
        self.counts: Counter[str] = Counter()
        self.notes: dict[str, str] = {}
        self.recent: deque[tuple[float, Call]] = deque()  # (made at, call) of calls Redis made, oldest first
        #: Set by the background thread: when the master the clients use was last confirmed with the sentinels.
        #: Calls made since shortly before it are kept: a master found changed later may have lost them.
        self.master_confirmed_at: float | None = None
        self.failing_since: float | None = None  # Redis has not answered the thread since
        self.stall_began: float | None = None  # the first failure since the calls last caught up
        self.failure_began: float | None = None  # the first failure that may have lost writes, not yet rechecked
        self.retry_at = 0.0
        self.catch_up_until = 0.0
        self.unreplicated = 0  # admissions made since the last replica wait
        self.problems = ThrottledLog(clock)

    # -- the callers' side -----------------------------------------------------------------------------------------
    def holding(self) -> bool:
        """True while calls wait here (and CATCH_UP_S after): a new call joins them rather than try Redis."""
        return bool(self.calls) or self.clock() < self.catch_up_until

    def hand_over(self, call: Call, failure: BaseException | None = None) -> bool:
        """Hold a call; False (counted as given up) when OUTBOX_MAX calls are already held. ``failure``: the
        call's own attempt failed (Redis may still have made it)."""
        with self.lock:
            if failure is not None:
                call.attempted = True
                self.stall_began = self.stall_began or call.since
                if may_have_lost_writes(failure):
                    self.failure_began = self.failure_began or call.since
            if len(self.calls) >= OUTBOX_MAX:
                self.counts[C.refused_field(call.obs_point, "given_up")] += 1
                accepted = False
            else:
                self.calls.append(call)
                accepted = True
        if failure is not None:
            self.problems.warning(f"Redis slow or unavailable ({describe(failure)}); calls are handed to the "
                                  "background thread until it catches up")
        self.wake()
        return accepted

    def made(self, call: Call, admitted: bool = True) -> None:
        """Redis made a call (an admission, an early entry): keep it for the recheck after a failover; an
        admission (``admitted``) also for the replica wait."""
        now = self.clock()
        with self.lock:
            self.recent.append((now, call))
            # Keep what a recheck may need: the window before now, before a failure not yet rechecked, and before
            # the master was last confirmed (a change found later may have lost everything since).
            confirmed = now if self.master_confirmed_at is None else self.master_confirmed_at
            horizon = min(now, self.failure_began or now, confirmed) - RECHECK_WINDOW_S
            while self.recent and (self.recent[0][0] < horizon or len(self.recent) > OUTBOX_MAX):
                self.recent.popleft()
            self.unreplicated += admitted

    def owe(self, field: str, n: int = 1) -> None:
        with self.lock:
            self.counts[field] += n
        self.wake()

    def suspect(self, at: float) -> None:
        """Writes may have been lost since ``at`` (the sentinels name another master than at ``at``): recheck
        what came from RECHECK_WINDOW_S before it."""
        with self.lock:
            self.failure_began = at if self.failure_began is None else min(self.failure_began, at)
        self.wake()

    def note(self, plan_ids: list[str], cause: str) -> None:
        with self.lock:
            for plan_id in plan_ids:
                if len(self.notes) < OUTBOX_MAX:
                    self.notes[plan_id] = cause
        self.wake()

    # -- the background thread's side ----------------------------------------------------------------------------
    def due(self) -> float | None:
        """When the thread has work here next (monotonic s), or None."""
        with self.lock:
            if self.calls or self.failure_began is not None:
                return self.retry_at
            return self.clock() if self.counts or self.notes else None

    def run_once(self) -> None:
        """One pass: make a batch of held calls, recheck after a failure, pay counts and notes. A Redis that
        does not answer leaves everything held and sets the next try (backoff)."""
        now = self.clock()
        if now < self.retry_at:
            return
        outage = self.stall_began is not None or self.failure_began is not None
        try:
            self.recheck(now)
            refused_for_now = self.make_calls(now)
            self.pay()
            if refused_for_now is not None:
                raise refused_for_now
        except Exception as exc:  # the ledger classifies: any failure here means "not now"
            if failure_kind(exc) == "config_error":
                self.refuse_held("config_error", exc)
                return
            self.failing(exc, now)
            return
        with self.lock:
            if outage and not self.calls:  # the end of an outage (not of a busy spell): callers keep handing over
                self.catch_up_until = self.clock() + CATCH_UP_S
                self.stall_began = None
        if self.failing_since is not None:
            self.problems.warning(f"Redis answers again after {now - self.failing_since:.1f}s; held calls made")
            self.failing_since = None

    def failing(self, exc: BaseException, now: float) -> None:
        with self.lock:
            if self.failing_since is None:
                self.failing_since = now
                self.problems.warning(f"Redis unavailable ({describe(exc)}); {len(self.calls)} call(s) held, "
                                      f"made once it answers (at most {OUTBOX_MAX})")
            self.stall_began = self.stall_began or now
            if may_have_lost_writes(exc):
                self.failure_began = self.failure_began or now
            for call in list(self.calls)[:OUTBOX_BATCH]:
                call.attempted = True  # a pipeline that failed may have been made in part
            self.retry_at = now + backoff(now - self.failing_since)

    def refuse_held(self, cause: str, exc: BaseException | None = None) -> int:
        """Count every held call as refused for ``cause``: a user Redis refuses (config_error: they can never be
        made), or the exit (given_up); returns how many."""
        with self.lock:
            calls, self.calls = list(self.calls), deque()
            for call in calls:
                self.counts[C.refused_field(call.obs_point, cause)] += 1
        if exc is not None:
            self.problems.warning(f"{len(calls)} held call(s) refused by Redis: {describe(exc)}")
        return len(calls)

    def make_calls(self, now: float) -> BaseException | None:
        """Make a batch of held calls in one pipeline; returns a reply that refused some for now (BUSY ...)."""
        with self.lock:
            batch = list(self.calls)[:OUTBOX_BATCH]
        if not batch:
            return None
        replies = self.make(batch, now)
        self.trace("made", batch, replies)
        retry: list[Call] = []
        refused_for_now = None
        for call, reply in zip(batch, replies, strict=True):
            if isinstance(reply, BaseException):
                kind = failure_kind(reply)
                if kind == "unavailable":  # refused before it ran (BUSY, LOADING, READONLY ...): try again
                    retry.append(call)
                    refused_for_now = reply
                    continue
                self.owe(C.refused_field(call.obs_point, "config_error" if kind == "config_error" else "unavailable"))
                self.problems.warning(f"held {call.obs_point} call refused by Redis: {describe(reply)}")
            elif call.late:
                self.admitted(call, reply, now, resend_kept=True)
            elif status_of(call, reply) != "duplicate":
                self.made(call, admitted=False)
        with self.lock:
            for _ in batch:
                if self.calls:
                    self.calls.popleft()
            self.calls.extendleft(reversed(retry))
        return refused_for_now

    def make(self, calls: list[Call], now: float) -> list[Any]:
        """Make calls in one pipeline, each as late as it is (an admission its age; an early call its age, and
        stale past RIDE_OUT_S); the replies, a failed one as its exception."""
        pipe = self.ledger.client.pipeline(transaction=False)
        for call in calls:
            age_ms = int((now - call.since) * 1000)
            if call.late:
                self.ledger.admit(call.plan_id, call.symbol, call.decision, call.token, age_ms, pipe=pipe)
            else:
                self.ledger.early(call.plan_id, call.symbol, call.decision, call.obs_point, {"deferred_ms": age_ms},
                                  stale=now - call.since > RIDE_OUT_S, pipe=pipe)
        return list(pipe.execute(raise_on_error=False))

    def trace(self, what: str, calls: list[Call], replies: list[Any]) -> None:
        if trace.isEnabledFor(logging.DEBUG):
            pool = self.ledger.client.connection_pool
            server = getattr(pool, "master_address", None) or getattr(pool, "connection_kwargs", {}).get("port")
            said = [r if isinstance(r, BaseException) else status_of(c, r) for c, r in zip(calls, replies, strict=True)]
            trace.debug("%s %d call(s) on %s: %s", what, len(calls), server,
                        " ".join(f"{c.plan_id}@{c.obs_point[:5]}={s}" for c, s in zip(calls, said, strict=True)))

    def admitted(self, call: Call, reply: Any, now: float, resend_kept: bool) -> None:
        """An admission made by the thread: a new lease needs its first message; a kept one needs it only when
        the caller never saw the reply (its message was never sent)."""
        outcome = admission(reply)
        if outcome.status == "recorded" and self.recorded is not None:  # recorded at once: its task's events
            self.recorded(LateMessage(call.plan_id, call.symbol, call.decision, outcome.published_ms,
                                      outcome.deadline_ms), Recorded(outcome.reason, 0))
        if outcome.status == "admitted" or (outcome.status == "kept" and resend_kept):
            self.send(LateMessage(call.plan_id, call.symbol, call.decision, outcome.published_ms,
                                  outcome.deadline_ms))
        if outcome.status != "duplicate":  # a refusal too: its count and marker could be lost like a lease
            self.made(call, admitted=outcome.status == "admitted")

    def recheck(self, now: float) -> None:
        """After a failure that may have lost writes: make again every call Redis made from RECHECK_WINDOW_S
        before it until now (the same token and publish time for an admission; an early call with its age).
        What vanished is made anew (a new lease and first message, or the entry); what survived is 'kept' or
        'duplicate', and nothing is written."""
        with self.lock:
            began = self.failure_began
            if began is None:
                return
            again = [(at, c) for at, c in self.recent if at >= began - RECHECK_WINDOW_S]
        if again:
            calls = [call for _at, call in again]
            replies = self.make(calls, now)
            self.trace(f"rechecked (failure at {began:.3f})", calls, replies)
            for call, reply in zip(calls, replies, strict=True):
                if isinstance(reply, BaseException):
                    raise reply
                status = status_of(call, reply)
                if status in ("kept", "duplicate"):
                    continue
                if status not in ("dropped", "backlog"):  # a refusal says the same whether or not it survived
                    self.problems.warning(f"plan {call.plan_id}'s {call.obs_point} call vanished (a failover?): "
                                          "made again")
                if call.late:
                    self.admitted(call, reply, now, resend_kept=False)
        with self.lock:
            if self.failure_began == began:
                self.failure_began = None

    def pay(self) -> None:
        with self.lock:
            counts, self.counts = self.counts, Counter()
            notes, self.notes = self.notes, {}
        try:
            self.ledger.count(dict(counts))
            self.ledger.note(notes)
        except Exception:
            with self.lock:
                self.counts.update(counts)
                for plan_id, cause in notes.items():
                    self.notes.setdefault(plan_id, cause)
            raise

    def replica_wait(self) -> None:
        """With P28_REPLICA_WAIT_MS: wait for a replica to have this process's admissions so far (off the
        callers' path); those no replica acknowledged in time are counted unreplicated."""
        with self.lock:
            n, self.unreplicated = self.unreplicated, 0
        if n and not self.ledger.replicated_after_write():
            self.owe(C.unreplicated_field("admit"), n)
