"""The outbox's rules (client/outbox.py), unit-tested against a fake ledger and a fake clock: no Redis, no thread,
no sleeping; each test drives the background thread's passes (``run_once``) by hand at the times it chooses.

The rules: ride out an outage of any length (calls held, made once Redis answers, with their age); callers keep
handing over for CATCH_UP_S after it; give up only beyond OUTBOX_MAX and at exit, counted ``given_up``; settle a
call whose reply was lost by making it again (an admission finds its own lease: 'kept', its first message sent;
an early call finds its dedupe key: 'duplicate'); after a failure, admit again the admissions of the
RECHECK_WINDOW_S before it; an early call held past RIDE_OUT_S is stale; a refused user refuses the held calls.
The real-Redis stalls (test_stall.py, test_redis_errors.py, test_early.py) are the integration layer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis

from observer_tasks.client import outbox as outbox_module
from observer_tasks.client.calls import Call
from observer_tasks.client.outbox import CATCH_UP_S, Outbox
from observer_tasks.core import contract as C
from observer_tasks.core.connections import Unavailable, classified
from observer_tasks.core.messages import LateMessage
from observer_tasks.core.settings import LATE_POINT, Settings
from observer_tasks.core.timings import RECHECK_WINDOW_S, RETRY_MAX_S, RETRY_S, RIDE_OUT_S

EARLY = Settings().early_points[0]
#: The fake ledger's window (MAX_WAIT_MS): an admission made later than this after its call is recorded at once.
WINDOW_MS = 2000
START = 1000.0


class Clock:
    """The outbox's monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.t = START

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> float:
        self.t += seconds
        return self.t


class FakePipe:
    def __init__(self, ledger: FakeLedger) -> None:
        self.ledger, self.ops = ledger, []  # type: ignore[var-annotated]

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        self.ledger.attempts += 1
        if self.ledger.down is not None:  # the whole pipeline fails: nothing made
            raise self.ledger.down
        replies: list[Any] = []
        for op in self.ops:
            refusal = self.ledger.refuse_reply.get(op[1])
            replies.append(refusal if refusal is not None else self.ledger.do(op))
        return replies


@dataclass
class FakeLedger:
    """What the outbox asks of the ledger, on a dict: leases by plan (token, published ms, deadline ms), early
    dedupe keys, entries, counts and notes. ``down``: every call raises it; ``refuse_reply``: a plan's step
    answers with that error (refused before it ran)."""

    clock: Clock
    down: BaseException | None = None
    refuse_reply: dict[str, BaseException] = field(default_factory=dict)
    leases: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    dedupe: set[tuple[str, str]] = field(default_factory=set)
    entries: list[tuple[str, str, str, dict[str, Any]]] = field(default_factory=list)
    made: list[tuple[Any, ...]] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    notes: dict[str, str] = field(default_factory=dict)
    attempts: int = 0
    replicas: bool = True

    @property
    def client(self) -> FakeLedger:
        return self

    def pipeline(self, transaction: bool = True) -> FakePipe:
        return FakePipe(self)

    def now_ms(self) -> int:
        return round(self.clock() * 1000)

    # -- the steps, queued on the pipeline as the real Ledger does ---------------------------------------------
    def admit(self, plan_id: str, symbol: str, decision: str, token: str = "", age_ms: int = 0,
              context: Any = None, pipe: Any = None) -> None:
        pipe.ops.append(("admit", plan_id, token, age_ms))

    def early(self, plan_id: str, symbol: str, decision: str, obs_point: str, context: Any = None,
              stale: bool = False, pipe: Any = None) -> None:
        pipe.ops.append(("early", plan_id, obs_point, stale, dict(context or {})))

    def do(self, op: tuple[Any, ...]) -> Any:
        """Make one step (what admit.lua / early.lua do, reduced to their replies)."""
        self.made.append(op)
        if op[0] == "early":
            _, plan, point, stale, context = op
            if (point, plan) in self.dedupe:
                return "duplicate"
            self.dedupe.add((point, plan))
            reason = "redis_error" if stale else "missing"
            self.entries.append((point, plan, reason, context))
            return reason
        _, plan, token, age_ms = op
        published = self.now_ms() - age_ms
        deadline = published + WINDOW_MS
        if plan in self.leases:
            own, was_published, was_deadline = self.leases[plan]
            if token and own == token:
                return ["kept", str(was_published), str(was_deadline)]
            return ["duplicate", str(published), str(deadline)]
        if age_ms >= WINDOW_MS:  # held past its whole window: recorded at once
            self.leases[plan] = ("", published, deadline)
            self.entries.append((LATE_POINT, plan, "redis_error", {"deferred_ms": age_ms}))
            return ["recorded", str(published), str(deadline), "redis_error"]
        self.leases[plan] = (token, published, deadline)
        return ["admitted", str(published), str(deadline)]

    def admitted_now(self, call: Call) -> tuple[int, int]:
        """The caller's own admission, made directly (its reply reached the caller, or was lost)."""
        reply = self.do(("admit", call.plan_id, call.token, 0))
        assert reply[0] == "admitted"
        return int(reply[1]), int(reply[2])

    def refused(self) -> BaseException | None:
        """What a step run alone raises while Redis is down (Ledger.run classifies it)."""
        down = self.down
        return classified(down) if isinstance(down, redis.RedisError) else down

    def count(self, counts: dict[str, int]) -> None:
        if counts and (refused := self.refused()) is not None:  # (nothing to pay: no round trip)
            raise refused
        self.counts.update(counts)

    def note(self, notes: dict[str, str]) -> None:
        if notes and (refused := self.refused()) is not None:
            raise refused
        self.notes.update(notes)

    def replicated_after_write(self) -> bool:
        return self.replicas


@dataclass
class Box:
    outbox: Outbox
    ledger: FakeLedger
    clock: Clock
    sent: list[LateMessage]

    def run(self) -> None:
        """One pass of the background thread at the time it is due (or now)."""
        due = self.outbox.due()
        if due is not None and due > self.clock():
            self.clock.t = due
        self.outbox.run_once()

    def run_for(self, seconds: float) -> int:
        """The thread's passes for ``seconds`` of fake time, each when it is due; returns how many."""
        end, passes = self.clock() + seconds, 0
        while True:
            due = self.outbox.due()
            if due is None or due > end:
                break
            self.clock.t = max(self.clock(), due)
            self.outbox.run_once()
            passes += 1
        self.clock.t = end
        return passes


@pytest.fixture
def box() -> Iterator[Box]:
    clock = Clock()
    ledger = FakeLedger(clock)
    sent: list[LateMessage] = []
    yield Box(Outbox(ledger, sent.append, lambda: None, clock=clock), ledger, clock, sent)


def late(plan: str, since: float, token: str | None = None) -> Call:
    return Call(LATE_POINT, plan, "BTCUSDT", "EXECUTE", token if token is not None else f"tok-{plan}", since)


def early(plan: str, since: float) -> Call:
    return Call(EARLY, plan, "BTCUSDT", "EXECUTE", "", since)


OUTAGE = redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
TIMEOUT = redis.TimeoutError("Timeout reading from socket")
BUSY = redis.ResponseError("BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.")
NOPERM = redis.ResponseError("NOPERM this user has no permissions to run the 'evalsha' command")
WRONGPASS = redis.AuthenticationError("WRONGPASS invalid username-password pair or user is disabled.")
#: Outages as the thread meets them: a refused connection, a timeout, a server loading its data, and the
#: ledger's own classification of any of them.
OUTAGES = {"refused": OUTAGE, "timeout": TIMEOUT, "loading": redis.BusyLoadingError("Redis is loading the dataset"),
           "unavailable": Unavailable("ConnectionError: Error 111 connecting to 127.0.0.1:6379.")}


def near(ms: float, expected_ms: float) -> bool:
    """Equal to the millisecond (the outbox truncates ages to whole ms)."""
    return abs(ms - expected_ms) <= 1


def given_up(box: Box, point: str) -> int:
    return box.outbox.counts[C.refused_field(point, "given_up")] + box.ledger.counts[C.refused_field(point, "given_up")]


# -- ride-out ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("outage", list(OUTAGES))
def test_calls_are_held_through_an_outage_of_any_length_and_made_once_with_their_age(box: Box, outage: str) -> None:
    box.ledger.down = OUTAGES[outage]
    t0 = box.clock()
    assert box.outbox.hand_over(late("old", t0), OUTAGES[outage])  # the caller's own attempt failed
    assert box.outbox.holding()
    box.clock.advance(0.5)
    assert box.outbox.hand_over(early("e-old", box.clock()))  # later callers join without trying Redis
    passes = box.run_for(28.0)
    new_since = box.clock()
    assert box.outbox.hand_over(early("e-new", new_since))
    assert box.outbox.hand_over(late("new", new_since))
    passes += box.run_for(1.5)  # 30 s into the outage: far past RIDE_OUT_S, nothing given up
    assert len(box.outbox.calls) == 4 and box.ledger.made == [] and box.sent == []
    assert not +box.outbox.counts and not box.ledger.counts
    # The thread kept trying, backing off from RETRY_S to RETRY_MAX_S, never hammering.
    assert 29.5 / RETRY_MAX_S * 0.9 <= passes <= 29.5 / RETRY_S and box.ledger.attempts == passes

    box.ledger.down = None  # Redis answers: each call made once, with its age
    box.run()
    now = box.clock()
    assert not box.outbox.calls
    made = {op[1]: op for op in box.ledger.made}
    assert sorted(made) == ["e-new", "e-old", "new", "old"] and len(box.ledger.made) == 4
    assert near(made["old"][3], (now - t0) * 1000) and near(made["new"][3], (now - new_since) * 1000)
    # The admission made within its window is admitted with its call's publish time and gets its message; the
    # one whose whole window passed is recorded redis_error by the admission (no message).
    (message,) = box.sent
    assert message.plan_id == "new" and near(message.published_ms, new_since * 1000)
    assert message.deadline_ms - message.published_ms == WINDOW_MS
    entries = {plan: (reason, context) for _point, plan, reason, context in box.ledger.entries}
    assert entries["old"][0] == "redis_error"
    # An early call held past RIDE_OUT_S is stale (redis_error); a younger one looks now (missing here).
    assert (made["e-old"][3], made["e-new"][3]) == (True, False)
    assert entries["e-old"][0] == "redis_error" and entries["e-new"][0] == "missing"
    assert near(entries["e-new"][1]["deferred_ms"], (now - new_since) * 1000)
    box.run_for(5.0)
    assert len(box.ledger.made) == 4  # nothing made twice


def test_a_reply_refused_for_now_keeps_its_call_and_the_others_are_made(box: Box) -> None:
    """BUSY (LOADING, READONLY ...) on one step of the pipeline: that call is tried again, the rest are made."""
    box.ledger.refuse_reply["b1"] = BUSY
    for call in (late("a1", box.clock()), late("b1", box.clock()), early("c1", box.clock())):
        assert box.outbox.hand_over(call, TIMEOUT)
    box.clock.advance(0.01)
    box.run()
    assert [c.plan_id for c in box.outbox.calls] == ["b1"] and [op[1] for op in box.ledger.made] == ["a1", "c1"]
    assert box.outbox.failing_since is not None  # not an answer: the thread backs off
    box.ledger.refuse_reply.clear()
    box.run()
    assert not box.outbox.calls and [op[1] for op in box.ledger.made].count("b1") == 1
    # (a1, admitted as the BUSY reply came, is in the window before that failure: rechecked, 'kept', no message)
    assert sorted(m.plan_id for m in box.sent) == ["a1", "b1"]


def test_an_early_call_held_past_ride_out_is_stale(box: Box) -> None:
    box.ledger.down = OUTAGE
    t0 = box.clock()
    box.outbox.hand_over(early("stale", t0), OUTAGE)
    box.outbox.hand_over(early("fresh", t0 + 0.1))
    box.outbox.hand_over(early("edge", t0 + 0.06))
    box.ledger.down = None
    box.clock.t = t0 + RIDE_OUT_S + 0.05
    box.outbox.run_once()
    stale = {op[1]: op[3] for op in box.ledger.made}
    assert stale == {"stale": True, "fresh": False, "edge": False}
    assert {plan: reason for _p, plan, reason, _c in box.ledger.entries} == {
        "stale": "redis_error", "fresh": "missing", "edge": "missing"}


# -- catch-up ---------------------------------------------------------------------------------------------------
def test_callers_keep_handing_over_for_catch_up_s_after_an_outage(box: Box) -> None:
    assert not box.outbox.holding()
    box.ledger.down = OUTAGE
    box.outbox.hand_over(late("p1", box.clock()), OUTAGE)
    box.run_for(3.0)
    assert box.outbox.holding()  # calls held: a new call joins them
    box.ledger.down = None
    box.run()
    caught_up = box.clock()
    assert not box.outbox.calls and box.outbox.holding()  # Redis is busy with every client's backlog
    box.clock.t = caught_up + CATCH_UP_S - 0.01
    assert box.outbox.holding()
    box.outbox.hand_over(early("e1", box.clock()))  # still handed over, and made on the next pass
    box.run()
    assert [op[1] for op in box.ledger.made] == ["p1", "e1"]
    box.clock.t = caught_up + CATCH_UP_S + 0.01  # a call made during catch-up does not extend it
    assert not box.outbox.holding()


def test_no_catch_up_without_a_failure(box: Box) -> None:
    """Counts and notes paid, nothing failed: callers go on calling Redis themselves."""
    box.outbox.owe(C.refused_field(EARLY, "invalid_input"))
    box.outbox.note(["p1"], "first-message queue full")
    box.run()
    assert box.ledger.counts == {C.refused_field(EARLY, "invalid_input"): 1}
    assert box.ledger.notes == {"p1": "first-message queue full"} and not box.outbox.holding()
    assert box.outbox.due() is None


# -- give-up ----------------------------------------------------------------------------------------------------
def test_calls_beyond_outbox_max_are_given_up_and_counted(box: Box, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox_module, "OUTBOX_MAX", 3)
    box.ledger.down = OUTAGE
    accepted = [box.outbox.hand_over(late("p1", box.clock()), OUTAGE), box.outbox.hand_over(early("e1", box.clock())),
                box.outbox.hand_over(late("p2", box.clock())),
                box.outbox.hand_over(late("p3", box.clock())), box.outbox.hand_over(early("e2", box.clock()))]
    assert accepted == [True, True, True, False, False]
    assert (given_up(box, LATE_POINT), given_up(box, EARLY)) == (1, 1)
    box.run_for(10.0)
    box.ledger.down = None
    box.run()
    assert sorted(op[1] for op in box.ledger.made) == ["e1", "p1", "p2"]  # the held ones, not the given up
    assert box.ledger.counts == {C.refused_field(LATE_POINT, "given_up"): 1, C.refused_field(EARLY, "given_up"): 1}


def test_calls_still_held_at_exit_are_given_up_and_counted(box: Box) -> None:
    box.ledger.down = OUTAGE
    for call in (late("p1", box.clock()), late("p2", box.clock()), early("e1", box.clock())):
        box.outbox.hand_over(call, OUTAGE)
    box.run_for(1.0)
    assert box.outbox.refuse_held("given_up") == 3
    assert not box.outbox.calls and (given_up(box, LATE_POINT), given_up(box, EARLY)) == (2, 1)
    assert box.outbox.refuse_held("given_up") == 0
    box.ledger.down = None  # the exit flush pays them once Redis answers
    box.outbox.pay()
    assert box.ledger.counts == {C.refused_field(LATE_POINT, "given_up"): 2, C.refused_field(EARLY, "given_up"): 1}
    assert box.ledger.made == []


def test_a_flush_that_reaches_redis_gives_up_nothing(box: Box) -> None:
    box.ledger.down = OUTAGE
    box.outbox.hand_over(late("p1", box.clock()), OUTAGE)
    box.run_for(0.2)
    box.ledger.down = None
    box.run()
    assert box.outbox.refuse_held("given_up") == 0 and given_up(box, LATE_POINT) == 0
    assert [m.plan_id for m in box.sent] == ["p1"]


# -- settle by making again -----------------------------------------------------------------------------------
def test_a_call_whose_reply_was_lost_is_settled_by_making_it_again(box: Box) -> None:
    """The caller's attempt timed out after Redis made it: made again, the admission finds its own lease by
    token ('kept') and its first message is sent with the first attempt's times, once; the early call finds its
    dedupe key ('duplicate'). An attempt Redis never made is simply made now. Nothing is counted refused."""
    t0 = box.clock()
    landed, never, theirs = late("landed", t0), late("never", t0), late("theirs", t0, token="tok-mine")
    first_times = box.ledger.admitted_now(landed)  # Redis made it; the reply was lost
    box.ledger.admitted_now(late("theirs", t0 - 1, token="tok-another-caller"))  # another caller's plan
    box.ledger.do(("early", "e-landed", EARLY, False, {}))
    for call in (landed, never, theirs, early("e-landed", t0), early("e-never", t0)):
        assert box.outbox.hand_over(call, TIMEOUT)
    box.clock.advance(0.3)
    box.run()
    assert not box.outbox.calls
    replies = {op[1]: box.ledger.leases.get(op[1]) for op in box.ledger.made if op[0] == "admit"}
    assert set(replies) == {"landed", "never", "theirs"}
    sent = {m.plan_id: (m.published_ms, m.deadline_ms) for m in box.sent}
    assert sorted(sent) == ["landed", "never"] and sent["landed"] == first_times
    assert near(sent["never"][0], t0 * 1000) and sent["never"][1] - sent["never"][0] == WINDOW_MS
    assert sorted((plan, reason) for _p, plan, reason, _c in box.ledger.entries) == [
        ("e-landed", "missing"), ("e-never", "missing")]  # e-landed's one entry: its first attempt's
    assert not +box.outbox.counts and not box.ledger.counts
    box.run_for(2.0)
    assert len(box.sent) == 2  # sent once


def test_a_pipeline_that_failed_part_way_is_settled_the_same_way(box: Box) -> None:
    """A pipeline whose reply was lost may have been made in part: made again, it finds what it made."""
    call = late("p1", box.clock())
    box.outbox.hand_over(call, TIMEOUT)
    times = box.ledger.admitted_now(call)  # the thread's pipeline reached Redis ...
    box.ledger.down = TIMEOUT  # ... and its reply was lost
    box.run()
    assert list(box.outbox.calls) == [call]
    box.ledger.down = None
    box.run()
    assert [(m.plan_id, m.published_ms, m.deadline_ms) for m in box.sent] == [("p1", *times)]


# -- recheck after a failure ------------------------------------------------------------------------------------
def test_admissions_made_in_the_recheck_window_before_a_failure_are_admitted_again(box: Box) -> None:
    """A failover can lose admissions asynchronous replication had not copied: after any failure the thread admits
    again (same token, same publish time) the admissions of the RECHECK_WINDOW_S before it. A lost one is
    'admitted' (a new lease and a new first message); one that survived is 'kept' (no second message)."""
    t0 = box.clock()
    before = late("before", t0)
    box.ledger.admitted_now(before)
    box.outbox.made(before)  # made directly, long before the failure
    box.clock.advance(RECHECK_WINDOW_S + 2.0)
    survived, lost = late("survived", box.clock()), late("lost", box.clock())
    for call in (survived, lost):
        box.ledger.admitted_now(call)
        box.outbox.made(call)
    box.run()
    assert box.ledger.made[-1][1] == "lost" and len(box.ledger.made) == 3  # no failure: no recheck
    box.clock.advance(1.0)
    failed_at = box.clock()
    # The failover: the new master never had "lost" (nor "before"); callers' calls fail meanwhile.
    del box.ledger.leases["lost"], box.ledger.leases["before"]
    box.ledger.down = OUTAGE
    box.outbox.hand_over(late("during", failed_at), OUTAGE)
    box.run_for(0.5)  # within the plans' window: admitted again, not recorded at once
    box.ledger.down = None
    box.run()
    now = box.clock()
    rechecked = [op[1] for op in box.ledger.made[3:] if op[1] != "during"]
    assert sorted(rechecked) == ["lost", "survived"]  # not "before": outside the window
    assert [m.plan_id for m in box.sent] == ["lost", "during"]
    (again,) = [m for m in box.sent if m.plan_id == "lost"]
    assert near(again.published_ms, lost.since * 1000)  # its own publish time, moved back by its age
    made_lost = [op for op in box.ledger.made if op[1] == "lost"][-1]
    assert made_lost[2] == lost.token and near(made_lost[3], (now - lost.since) * 1000)
    assert "before" not in box.ledger.leases and box.outbox.failure_began is None
    n = len(box.ledger.made)
    box.run_for(RECHECK_WINDOW_S)
    assert len(box.ledger.made) == n  # rechecked once per failure


def test_a_master_found_changed_late_rechecks_every_call_since_it_was_last_confirmed(box: Box) -> None:
    """What the chaos soak found (seed 4, a BUSY spell past Sentinel's down-after on a loaded machine): the held
    calls were made on the old master the moment its script ended, a fraction of a second before the sentinels
    switched to the replica; the old master took them (and, until it was demoted 10 s later, the callers'
    direct calls) and lost them all. The change is found later than that (here 8 s: the thread was busy), so the
    recheck starts from when the old master was last confirmed, covers the calls made after it too, and makes
    the early entries again as well as the admissions; what survived is 'duplicate' / 'kept'."""
    confirmed = box.clock()
    box.outbox.master_confirmed_at = confirmed  # the background thread asked the sentinels
    box.clock.advance(0.3)
    for call in (late("held", box.clock()), early("held-e", box.clock())):
        box.outbox.hand_over(call, TIMEOUT)
    box.run()  # made on the old master
    box.clock.advance(1.0)
    for call in (late("direct", box.clock()), late("kept", box.clock())):
        box.ledger.admitted_now(call)
        box.outbox.made(call)
    box.ledger.do(("early", "direct-e", EARLY, False, {}))
    box.outbox.made(early("direct-e", box.clock()), admitted=False)
    box.clock.advance(8.0)  # past RECHECK_WINDOW_S: a window counted back from the discovery would miss them all
    # The new master has "kept" only (replicated before the switch); the rest vanished with the old one.
    for plan in ("held", "direct"):
        del box.ledger.leases[plan]
    box.ledger.dedupe -= {(EARLY, "held-e"), (EARLY, "direct-e")}
    sent_before, made_before = len(box.sent), len(box.ledger.made)
    box.outbox.suspect(confirmed)  # found now; the old master was last confirmed at `confirmed`
    box.run()
    again = {op[1] for op in box.ledger.made[made_before:]}
    assert again == {"direct", "direct-e", "held", "held-e", "kept"}
    assert box.sent[sent_before:] == []  # "kept" needs no second message; the others' windows have passed:
    redone = sorted((plan, reason) for _point, plan, reason, _ctx in box.ledger.entries[-4:])
    assert redone == [("direct", "redis_error"), ("direct-e", "redis_error"), ("held", "redis_error"),
                      ("held-e", "redis_error")]  # each recorded at once: the outage took its moment
    assert box.outbox.failure_began is None


def test_the_calls_a_recheck_may_need_are_kept_until_the_master_is_confirmed_again(box: Box) -> None:
    box.outbox.master_confirmed_at = box.clock()
    box.outbox.made(late("p1", box.clock()))
    box.clock.advance(RECHECK_WINDOW_S * 3)
    box.outbox.made(late("p2", box.clock()))
    assert [c.plan_id for _at, c in box.outbox.recent] == ["p1", "p2"]  # not confirmed since p1: kept
    box.outbox.master_confirmed_at = box.clock()
    box.outbox.made(late("p3", box.clock()))
    assert [c.plan_id for _at, c in box.outbox.recent] == ["p2", "p3"]


def test_a_recheck_that_fails_is_tried_again(box: Box) -> None:
    call = late("p1", box.clock())
    box.ledger.admitted_now(call)
    box.outbox.made(call)
    box.clock.advance(0.5)
    box.outbox.hand_over(early("e1", box.clock()), OUTAGE)
    del box.ledger.leases["p1"]
    box.ledger.refuse_reply["p1"] = BUSY  # the recheck's admission refused for now
    box.run()
    assert box.outbox.failure_began is not None and box.sent == [] and list(box.outbox.calls)
    box.ledger.refuse_reply.clear()
    box.run()
    assert [m.plan_id for m in box.sent] == ["p1"] and box.outbox.failure_began is None and not box.outbox.calls


# -- a refused user -----------------------------------------------------------------------------------------------
def test_a_refused_user_refuses_the_held_calls_as_config_error(box: Box) -> None:
    """WRONGPASS / NOPERM is configuration, not an outage: the held calls can never be made, so they are counted
    config_error (once Redis takes the counts) instead of being held."""
    box.ledger.down = OUTAGE
    for call in (late("p1", box.clock()), late("p2", box.clock()), early("e1", box.clock())):
        box.outbox.hand_over(call, OUTAGE)
    box.ledger.down = WRONGPASS  # e.g. the password rotated without the apply layer's URL
    box.run()
    assert not box.outbox.calls and box.ledger.made == [] and box.sent == []
    owed = {C.refused_field(LATE_POINT, "config_error"): 2, C.refused_field(EARLY, "config_error"): 1}
    assert dict(+box.outbox.counts) == owed
    box.run()  # still refused: the counts stay owed
    box.ledger.down = None
    box.run()
    assert box.ledger.counts == owed and not +box.outbox.counts


def test_a_step_refused_to_the_user_is_counted_config_error_and_the_others_made(box: Box) -> None:
    box.ledger.refuse_reply["p1"] = NOPERM
    for call in (late("p1", box.clock()), late("p2", box.clock())):
        box.outbox.hand_over(call, TIMEOUT)
    box.run()
    box.run()
    assert not box.outbox.calls and [m.plan_id for m in box.sent] == ["p2"]
    assert box.ledger.counts == {C.refused_field(LATE_POINT, "config_error"): 1}


# -- replica wait ------------------------------------------------------------------------------------------------
def test_admissions_no_replica_acknowledged_are_counted_unreplicated(box: Box) -> None:
    for plan in ("p1", "p2"):
        box.outbox.made(late(plan, box.clock()))
    box.ledger.replicas = False
    box.outbox.replica_wait()
    box.outbox.replica_wait()  # nothing new to wait for
    box.run()
    assert box.ledger.counts == {C.unreplicated_field("admit"): 2}


def test_only_a_failure_that_may_have_lost_writes_is_rechecked(box: Box) -> None:
    """A timeout or a busy server loses nothing Redis acknowledged: no recheck (it would cost a round of
    calls after every stall). A lost connection, a demotion or a restart may have: recheck; so does a
    master the sentinels name anew (``suspect``), which a hung master gives without any error but timeouts."""
    call = late("p1", box.clock())
    box.ledger.admitted_now(call)
    box.outbox.made(call)
    box.clock.advance(0.2)
    box.outbox.hand_over(early("e1", box.clock()), TIMEOUT)
    box.run()
    assert box.outbox.failure_began is None and [op[1] for op in box.ledger.made] == ["p1", "e1"]
    box.outbox.suspect(box.clock())
    box.run()
    assert [op[1] for op in box.ledger.made] == ["p1", "e1", "p1", "e1"] and box.outbox.failure_began is None
    box.clock.advance(0.2)
    box.outbox.hand_over(early("e2", box.clock()), redis.ReadOnlyError("You can't write against a read only replica."))
    box.run()
    assert [op[1] for op in box.ledger.made][-3:] == ["p1", "e1", "e2"]  # rechecked, then the held call made
