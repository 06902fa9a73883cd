"""Admission to late observation: the inflight bound, drops, duplicates, expiring leases (real Redis)."""

from __future__ import annotations

import base64
import json

import pytest
import redis

from observer_tasks import observe, observe_late
from observer_tasks.client.calls import Call
from observer_tasks.client.outbox import Outbox
from observer_tasks.core import contract as C
from observer_tasks.core.connections import redis_client
from observer_tasks.core.ledger import Ledger
from observer_tasks.core.messages import QUEUE, LateMessage
from observer_tasks.core.settings import LATE_POINT, Settings

from .conftest import DATA_URL, counters, inflight, late_entries, lease, move_lease, poll, stream_entries

EARLY = Settings().early_points[0]


def redis_ms(r: redis.Redis) -> int:
    sec, usec = r.time()
    return int(sec) * 1000 + int(usec) // 1000


def make_ledger(env: dict[str, str], **overrides: str) -> Ledger:
    return Ledger(Settings.from_env({**env, **overrides}), redis_client(DATA_URL, 1.0, "test"))


def test_drops_beyond_max_inflight_are_counted_exactly(r: redis.Redis, env: dict[str, str]) -> None:
    env["P28_LATE_OBS_MAX_INFLIGHT"] = "5"
    results = [observe_late(f"plan{i}", "BTCUSDT", "EXECUTE") for i in range(8)]
    assert results == ["enqueued"] * 5 + ["dropped"] * 3
    assert counters(r)("p28_late_obs_dropped") == 3
    assert inflight(r) == 5


def test_second_call_for_an_admitted_plan_sends_nothing(r: redis.Redis, env: dict[str, str]) -> None:
    broker = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    assert observe_late("p1", "BTCUSDT") == "enqueued"
    assert observe_late("p1", "BTCUSDT") == "duplicate"
    assert observe_late("p2", "BTCUSDT") == "enqueued"
    # The sender sends in order: once p2's message is there, p1's duplicate would be too.
    poll(lambda: broker.llen(QUEUE) >= 2, 5, what="messages in late_obs")
    bodies = [json.loads(m)["headers"]["id"] for m in broker.lrange(QUEUE, 0, -1)]
    assert sorted(bodies) == [C.task_id("p1"), C.task_id("p2")]
    assert inflight(r) == 2 and counters(r)("p28_late_obs_dropped") == 0


def test_expired_leases_hold_no_slot_but_stay_in_the_ledger(r: redis.Redis, env: dict[str, str]) -> None:
    # MAX_INFLIGHT 3, not 2: two plans waiting past their lease with MAX_INFLIGHT 2 now refuse further plans as
    # backlog (round-4 migration change 4; the next test).
    ledger = make_ledger(env, P28_LATE_OBS_MAX_INFLIGHT="3")
    assert [ledger.admit(p, "BTCUSDT", "").status for p in ("old1", "old2")] == ["admitted", "admitted"]
    for plan in ("old1", "old2"):  # their lease ends passed (Redis time), as after a crash nobody recorded
        r.zadd(C.INFLIGHT, {plan: redis_ms(r) - 1000})
    assert [ledger.admit(f"new{i}", "BTCUSDT", "").status for i in range(4)] == ["admitted"] * 3 + ["dropped"]
    assert inflight(r) == 5  # the two stale leases wait for the sweeper
    assert lease(r, "old1") is not None and lease(r, "old2") is not None


def test_plans_nobody_decides_refuse_further_admissions_as_backlog(r: redis.Redis, env: dict[str, str]) -> None:
    """Round-4 migration change 4: leases past their end hold no slot, but at most MAX_INFLIGHT such plans wait
    for a worker; beyond that observe_late returns "error", counted refused{cause="backlog"}, nothing left."""
    env["P28_LATE_OBS_MAX_INFLIGHT"] = "2"
    assert [observe_late(p, "BTCUSDT") for p in ("w1", "w2")] == ["enqueued"] * 2
    for plan in ("w1", "w2"):  # every worker down: their leases end and nobody records them
        move_lease(r, plan, 60_000)
    assert observe_late("w3", "BTCUSDT") == "error"
    poll(lambda: counters(r)("p28_observe_refused", LATE_POINT, "backlog") == 1, 5, what="backlog counted")
    assert lease(r, "w3") is None and inflight(r) == 2 and counters(r)("p28_late_obs_dropped") == 0


def test_lease_ends_grace_after_the_deadline_on_redis_time(r: redis.Redis, env: dict[str, str]) -> None:
    settings = Settings.from_env()
    ledger = Ledger(settings, redis_client(DATA_URL, 1.0, "test"))
    before = redis_ms(r)
    admission = ledger.admit("p1", "ETHUSDT", "SKIP")
    after = redis_ms(r)
    assert admission.status == "admitted" and before <= admission.published_ms <= after
    assert admission.deadline_ms - admission.published_ms == settings.late_obs_max_wait_ms
    assert r.zscore(C.INFLIGHT, "p1") == admission.deadline_ms + settings.sweep_grace_ms
    held = lease(r, "p1")
    assert held is not None and (held["symbol"], held["decision"]) == ("ETHUSDT", "SKIP")
    assert (held["published_ms"], held["deadline_ms"], held["end_ms"]) == (
        admission.published_ms, admission.deadline_ms, admission.deadline_ms + settings.sweep_grace_ms)
    assert ledger.admit("p1", "ETHUSDT", "SKIP").status == "duplicate"


def test_message_carries_the_admission_times(r: redis.Redis, env: dict[str, str]) -> None:
    broker = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    assert observe_late("p1", "ETHUSDT", "skip") == "enqueued"
    raw = poll(lambda: broker.lindex(QUEUE, 0), 5, what="the message")
    held = lease(r, "p1")
    assert held is not None
    args = json.loads(base64.b64decode(json.loads(raw)["body"]))[0]
    # The decision as passed (round-4 migration change 5: was upper-cased to "SKIP").
    assert args == ["p1", "ETHUSDT", "skip", held["published_ms"], held["deadline_ms"]]
    assert held["decision"] == "skip"


def test_disabled_switch(r: redis.Redis, env: dict[str, str]) -> None:
    env["P28_LATE_OBS_ENABLED"] = "off"
    assert observe_late("p1", "BTCUSDT") == "disabled"
    assert inflight(r) == 0 and redis.Redis.from_url(env["CELERY_BROKER_URL"]).llen(QUEUE) == 0


def test_heat_written_before_the_call_is_recorded_by_the_admission(r: redis.Redis, env: dict[str, str]) -> None:
    """Round-4 migration change 1: the admission records the plan at once (recorded_by admit, wait_ms 0, ok),
    sends no first message, and observe_late still returns "enqueued"."""
    r.hset(f"{Settings().heat_lookup_prefix}first", mapping={"heat_level": "warm", "heat_action": "NONE"})
    assert observe_late("first", "BTCUSDT", "EXECUTE") == "enqueued"
    (entry,) = late_entries(r)
    assert (entry["plan_id"], entry["heat_reason"], entry["recorded_by"], entry["wait_ms"], entry["heat_level"]) == (
        "first", "ok", "admit", "0", "warm")
    assert inflight(r) == 0 and r.get(C.dedupe_key(LATE_POINT, "first")) == b"R|ok"
    assert counters(r)("p28_late_obs_recorded", "admit") == 1
    assert observe_late("first", "BTCUSDT", "EXECUTE") == "duplicate"
    # A later plan's message is sent; none for the recorded one.
    broker = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    assert observe_late("second", "BTCUSDT") == "enqueued"
    poll(lambda: broker.llen(QUEUE) >= 1, 5, what="the second plan's message")
    assert [json.loads(m)["headers"]["id"] for m in broker.lrange(QUEUE, 0, -1)] == [C.task_id("second")]


def test_a_retried_admission_finds_its_own_lease_and_a_late_one_keeps_its_publish_time(
        r: redis.Redis, env: dict[str, str]) -> None:
    """A caller's admission whose reply was lost is made again by the outbox with the same token: 'kept' with
    the first lease's times (its message is then sent), never a 'duplicate' left to the sweeper. (Round-4
    migration change 9: the status of the retry is 'kept', was 'admitted'.)"""
    settings = Settings.from_env()
    ledger = Ledger(settings, redis_client(DATA_URL, 1.0, "test"))
    first = ledger.admit("p1", "BTCUSDT", "EXECUTE", token="tok-1")
    assert first.status == "admitted"
    assert ledger.admit("p1", "BTCUSDT", "EXECUTE", token="tok-1") == ("kept", first.published_ms,
                                                                       first.deadline_ms, "")
    assert ledger.admit("p1", "BTCUSDT", "EXECUTE", token="tok-2").status == "duplicate"
    assert ledger.admit("p1", "BTCUSDT", "EXECUTE").status == "duplicate"
    # Deferred 400 ms in the producer: published that much before Redis's now, the deadline with it.
    before = redis_ms(r)
    late = ledger.admit("p2", "BTCUSDT", "EXECUTE", token="tok-3", age_ms=400)
    assert late.status == "admitted" and before - 400 <= late.published_ms <= redis_ms(r) - 400
    assert late.deadline_ms - late.published_ms == settings.late_obs_max_wait_ms
    assert inflight(r) == 2 and late_entries(r) == []
    # Deferred 700 ms, past its whole 600 ms window: recorded redis_error by the admission (round-4 migration
    # change 3; was admitted with its deadline already passed).
    gone = ledger.admit("p3", "BTCUSDT", "EXECUTE", token="tok-4", age_ms=700)
    assert (gone.status, gone.reason, gone.deadline_ms - gone.published_ms) == ("recorded", "redis_error", 600)
    assert before - 700 <= gone.published_ms <= redis_ms(r) - 700
    assert [(e["plan_id"], e["heat_reason"], e["recorded_by"]) for e in late_entries(r)] == [
        ("p3", "redis_error", "admit")]


def test_a_call_made_again_finds_what_its_lost_attempt_did(r: redis.Redis, env: dict[str, str]) -> None:
    """Replaces the settle test (round-4 migration change 9: the settle step is gone). A held call whose first
    attempt's reply was lost is simply made again by the outbox: an admission Redis made finds its own lease
    ('kept') and its first message is sent with the first times; an early call Redis made finds its dedupe key
    ('duplicate'); a lost attempt Redis never made is made now. Each plan is recorded or admitted once, and
    nothing is counted as refused."""
    ledger = make_ledger(env)
    done = ledger.admit("done", "BTCUSDT", "", token="t-done")
    assert ledger.early("early-done", "BTCUSDT", "", EARLY) == "missing"
    sent: list[LateMessage] = []
    now = [0.0]
    outbox = Outbox(ledger, sent.append, lambda: None, clock=lambda: now[0])
    held = [Call(LATE_POINT, "done", "BTCUSDT", "", "t-done", 0.0), Call(LATE_POINT, "never", "BTCUSDT", "",
                                                                         "t-never", 0.0),
            Call(EARLY, "early-done", "BTCUSDT", "", "", 0.0), Call(EARLY, "early-never", "BTCUSDT", "", "", 0.0)]
    for call in held:  # each call's own attempt timed out: its reply lost
        assert outbox.hand_over(call, TimeoutError("reply lost"))
    now[0] = 0.3  # made 300 ms after the calls, within RIDE_OUT_S
    outbox.run_once()
    assert not outbox.calls
    by_plan = {m.plan_id: m for m in sent}
    assert sorted(by_plan) == ["done", "never"]
    assert (by_plan["done"].published_ms, by_plan["done"].deadline_ms) == (done.published_ms, done.deadline_ms)
    assert lease(r, "never") is not None and inflight(r) == 2
    assert sorted((e["obs_point"], e["plan_id"]) for e in stream_entries(r)) == [
        (EARLY, "early-done"), (EARLY, "early-never")]
    assert json.loads([e for e in stream_entries(r) if e["plan_id"] == "early-never"][0]["debug_json"])[
        "deferred_ms"] == 300
    assert not [k for k, v in counters(r).items() if k[0] == "p28_observe_refused" and v]
    # The lost attempts, if they land now, find what the calls made again did.
    assert ledger.admit("never", "BTCUSDT", "", token="t-never").status == "kept"
    assert ledger.early("early-never", "BTCUSDT", "", EARLY) == "duplicate"
    assert observe("early-done", "BTCUSDT") == "duplicate"


@pytest.mark.parametrize("refusal", ["dropped", "backlog"])
def test_a_refused_admission_made_again_is_counted_once(r: redis.Redis, env: dict[str, str], refusal: str) -> None:
    """The rest of the settle test's promise ("counts a lost call once"), kept by its replacement (round-4
    migration change 9): an admission refused by Redis (MAX_INFLIGHT live leases: dropped; too many plans
    waiting for a worker: backlog) whose reply was lost is made again by the outbox; the plan is counted once."""
    ledger = make_ledger(env, P28_LATE_OBS_MAX_INFLIGHT="1")
    assert ledger.admit("live", "BTCUSDT", "").status == "admitted"
    if refusal == "backlog":
        move_lease(r, "live", 60_000)  # it waits past its lease for a worker
    assert ledger.admit("p1", "BTCUSDT", "", token="t-p1").status == refusal  # Redis made it; the reply was lost
    sent: list[LateMessage] = []
    now = [0.0]
    outbox = Outbox(ledger, sent.append, lambda: None, clock=lambda: now[0])
    assert outbox.hand_over(Call(LATE_POINT, "p1", "BTCUSDT", "", "t-p1", 0.0), TimeoutError("reply lost"))
    now[0] = 0.3
    outbox.run_once()
    assert not outbox.calls and sent == [] and lease(r, "p1") is None
    family = ("p28_late_obs_dropped",) if refusal == "dropped" else ("p28_observe_refused", LATE_POINT, "backlog")
    assert counters(r)(*family) == 1, "the refusal of one call counted twice"
