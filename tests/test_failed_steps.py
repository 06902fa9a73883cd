"""A step that fails writes nothing: the plan stays leased and is recorded exactly once when the cause is gone;
a poisoned lease never blocks the sweep. Real Redis; the last two with a real worker."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable

import pytest
import redis

from observer_tasks import observe_late
from observer_tasks.core import contract as C
from observer_tasks.core.connections import redis_client
from observer_tasks.core.ledger import GONE, Ledger, Recorded
from observer_tasks.core.settings import LATE_POINT, Settings
from observer_tasks.core.timings import SWEEP_BATCH

from .conftest import (
    DATA_URL,
    HEAT,
    STREAM,
    Worker,
    assert_counters_match_the_stream,
    counters,
    inflight,
    late_entries,
    lease,
    move_lease,
    notes,
    poll,
    stream_entries,
)

EARLY = Settings().early_points[0]


def make_ledger(env: dict[str, str], **overrides: str) -> Ledger:
    return Ledger(Settings.from_env({**env, **overrides}), redis_client(DATA_URL, 1.0, "test"))


def no_counts(r: redis.Redis) -> bool:
    return not r.exists(C.COUNTERS)


def test_a_wrong_type_stream_fails_every_step_without_a_write(r: redis.Redis, env: dict[str, str]) -> None:
    ledger = make_ledger(env)
    admissions = {plan: ledger.admit(plan, "BTCUSDT", "EXECUTE") for plan in ("looked", "woken", "finished", "swept")}
    assert {a.status for a in admissions.values()} == {"admitted"}
    r.hset(HEAT + "looked", "heat_level", "hot")
    r.hset(HEAT + "woken", "heat_level", "warm")
    r.hset(HEAT + "early", "heat_level", "cold")
    move_lease(r, "swept", 60_000)
    r.set(STREAM, "not a stream")  # an operator's mistake, another tool
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        ledger.look("looked", 1, 0, admissions["looked"].deadline_ms)
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        ledger.finish("finished", "redis_error", 2)
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        ledger.early("early", "BTCUSDT", "", EARLY)
    woken = ledger.wake(["woken"])
    assert woken.recorded == {} and "WRONGTYPE" in woken.skipped["woken"]
    swept = ledger.sweep()
    assert swept.recorded == {} and "WRONGTYPE" in swept.skipped["swept"]
    # Nothing written: every lease kept, no other dedupe key, no counter moved.
    assert all(lease(r, plan) for plan in admissions) and inflight(r) == 4
    assert sorted(k.decode() for k in r.keys(C.DEDUPE_PREFIX + "*")) == sorted(
        C.dedupe_key(LATE_POINT, plan) for plan in admissions)
    assert no_counts(r)

    r.delete(STREAM)  # the cause fixed: each plan recorded once, by the step that runs next
    assert ledger.early("early", "BTCUSDT", "", EARLY) == "ok"
    assert ledger.look("looked", 2, 0, admissions["looked"].deadline_ms).reason == "ok"  # type: ignore[union-attr]
    assert ledger.wake(["woken"]).recorded["woken"].reason == "ok"
    assert isinstance(ledger.finish("finished", "redis_error", 2), Recorded)
    assert len(ledger.sweep().recorded) == 1
    woken = ledger.wake(["woken"])
    assert ledger.sweep().recorded == {} and (woken.recorded, woken.skipped) == ({}, {})
    assert ledger.look("looked", 3, 0, admissions["looked"].deadline_ms) == GONE
    assert sorted(e["plan_id"] for e in stream_entries(r)) == ["early", "finished", "looked", "swept", "woken"]
    assert inflight(r) == 0 and not [plan for plan in admissions if lease(r, plan)]
    assert_counters_match_the_stream(r)


@pytest.mark.parametrize("corrupt", ["a set", "not a number"])
def test_corrupt_counters_fail_before_the_entry(r: redis.Redis, env: dict[str, str], corrupt: str) -> None:
    ledger = make_ledger(env)
    admission = ledger.admit("p1", "BTCUSDT", "")
    r.hset(HEAT + "p1", "heat_level", "hot")
    if corrupt == "a set":
        r.sadd(C.COUNTERS, "x")
    else:
        r.hset(C.COUNTERS, C.WAIT_SUM_MS, "many")  # the field every ok record adds its wait to
    with pytest.raises(redis.ResponseError):
        ledger.look("p1", 1, 0, admission.deadline_ms)
    # The record's writes undone: no entry (the step's XADD was deleted again), the lease kept.
    assert r.xlen(STREAM) == 0 and lease(r, "p1") is not None and inflight(r) == 1
    r.delete(C.COUNTERS)
    assert ledger.look("p1", 2, 0, admission.deadline_ms).reason == "ok"  # type: ignore[union-attr]
    assert len(late_entries(r)) == 1
    assert_counters_match_the_stream(r)


def test_poisoned_leases_never_block_the_sweep(r: redis.Redis, env: dict[str, str]) -> None:
    ledger = make_ledger(env)
    for plan in ("good1", "good2", "badfields"):
        ledger.admit(plan, "ETHUSDT", "SKIP")
        move_lease(r, plan, 60_000)
    # A lease no admission writes (empty symbol and decision) that still reads as one: recorded as it is.
    good = lease(r, "badfields")
    assert good is not None
    r.set(C.dedupe_key(LATE_POINT, "badfields"), C.SEP.join(
        [C.LEASE, *(str(good[n]) if n.endswith("_ms") else "" for n in C.LEASE_FIELDS)]))
    # Leases that could break the sweep step (and so every sweep behind them), or that no admission writes:
    # unreadable, a field too many, times that are not whole numbers, too large to hold (infinite in Lua),
    # published after the deadline, a key of another type, a plan id the admission refuses.
    times = f"{good['published_ms']}|{good['deadline_ms']}|{good['end_ms']}"
    poisoned = {"notalease": "{", "toomany": f"L|{times}|t|S|D|x", "notnumbers": "L|soon|2|3|t|S|D",
                "infinite": "L|" + "|".join(["9" * 400] * 3) + "|t|S|D", "backwards": "L|5|2|3|t|S|D",
                "a:b": f"L|{times}|t|S|D"}
    for plan, raw in poisoned.items():
        r.set(C.dedupe_key(LATE_POINT, plan), raw)
        r.zadd(C.INFLIGHT, {plan: 1})
    r.hset(C.dedupe_key(LATE_POINT, "wrongtype"), "a", "b")
    r.zadd(C.INFLIGHT, {"wrongtype": 1})
    swept = ledger.sweep()
    assert (len(swept.recorded), sorted(swept.freed), swept.skipped) == (3, sorted([*poisoned, "wrongtype"]), {})
    entries = {e["plan_id"]: e for e in late_entries(r)}
    assert sorted(entries) == ["badfields", "good1", "good2"]
    assert (entries["badfields"]["symbol"], entries["badfields"]["apply_decision"]) == ("", "")
    assert inflight(r) == 0 and not [p for p in ("good1", "good2", "badfields") if lease(r, p)]
    assert_counters_match_the_stream(r)


def test_skipped_plans_are_passed_over_page_by_page(r: redis.Redis, env: dict[str, str]) -> None:
    """More overdue plans than one sweep step takes, every record failing: all reported, none written; then
    once the cause is fixed, every one recorded exactly once."""
    # (MAX_INFLIGHT above the plans: 200 plans waiting past their lease would refuse the next as backlog,
    # round-4 migration change 4.)
    ledger = make_ledger(env, P28_LATE_OBS_MAX_INFLIGHT=str(2 * SWEEP_BATCH))
    plans = [f"p{i}" for i in range(SWEEP_BATCH + 5)]
    for plan in plans:
        ledger.admit(plan, "BTCUSDT", "")
        move_lease(r, plan, 60_000)
    r.set(STREAM, "x")
    swept = ledger.sweep()
    assert swept.recorded == {} and sorted(swept.skipped) == sorted(plans)
    assert inflight(r) == len(plans) and no_counts(r)
    r.delete(STREAM)
    assert len(ledger.sweep().recorded) == len(plans)
    assert Counter(e["plan_id"] for e in late_entries(r)) == Counter(plans)
    assert_counters_match_the_stream(r)


@pytest.mark.slow
def test_wrong_type_stream_with_a_worker(r: redis.Redis, worker: Worker) -> None:
    """Three admitted plans while the stream's key holds a string: nothing lost; recorded once after the fix."""
    r.set(STREAM, "an operator's mistake")
    for plan in ("p1", "p2", "p3"):
        assert observe_late(plan, "BTCUSDT", "EXECUTE") == "enqueued"
    held = lease(r, "p1")
    assert held is not None
    sec, usec = r.time()  # HeatBridge stamps its write with Redis's time
    heat_ms = sec * 1000 + usec // 1000
    r.hset(HEAT + "p1", mapping={"heat_level": "hot", "ts_epoch": f"{heat_ms / 1000:.3f}"})
    poll(lambda: worker.output().count("could not record plan") >= 3, what="three failed records logged")
    poll(lambda: "sweeper could not record 3 overdue plan(s)" in worker.output(), timeout=20,
         what="the sweeper reports the plans it cannot record")
    assert all(lease(r, p) for p in ("p1", "p2", "p3")) and r.type(STREAM) == b"string"
    assert counters(r)("p28_observed", LATE_POINT, "0") == 0
    assert "the sweeper will record it" not in worker.output()
    r.delete(STREAM)
    entries = poll(lambda: len(late_entries(r)) >= 3 and late_entries(r), what="three entries after the fix")
    assert sorted(e["plan_id"] for e in entries) == ["p1", "p2", "p3"]
    # p1 has heat: ok when it was stamped by its deadline (round-4 migration change 2: the sweeper reads the heat
    # and its ts_epoch; was a timeout), else a timeout; recorded by the sweeper, or by a wake resync (another
    # database's FLUSHDB on a shared server). Each with the failed look's cause, as the sweeper reads it.
    in_time = heat_ms <= held["deadline_ms"]
    for e in entries:
        assert e["recorded_by"] in (("sweep", "wake") if e["plan_id"] == "p1" else ("sweep",))
        assert e["heat_reason"] == ("ok" if e["plan_id"] == "p1" and in_time else "timeout")
        assert e["recorded_by"] == "wake" or "WRONGTYPE" in json.loads(e["debug_json"])["failed"]
    p1 = next(e for e in entries if e["plan_id"] == "p1")
    print(f"\np1's heat {'in time' if in_time else 'after its deadline'}: {p1['heat_reason']} by {p1['recorded_by']}")
    poll(lambda: inflight(r) == 0, what="leases removed")
    assert len(late_entries(r)) == 3 and not notes(r)
    # A step's error note stays for debug_json until it expires with the dedupe TTL: none is left for ever.
    assert all(0 < r.ttl(C.FAILED + plan) <= 600 for plan in notes(r, failed=True))
    assert_counters_match_the_stream(r)


@pytest.mark.slow
def test_poisoned_lease_in_the_sweep_with_a_worker(r: redis.Redis, env: dict[str, str],
                                                  start_worker: Callable[..., Worker]) -> None:
    ledger = make_ledger(env)
    for plan in ("lost1", "lost2"):  # admitted, their messages never sent: only the sweeper can record them
        ledger.admit(plan, "BTCUSDT", "")
    r.set(C.dedupe_key(LATE_POINT, "poison"), "L|soon|1|1|t|S|D")
    r.zadd(C.INFLIGHT, {"poison": 1})
    w = start_worker()
    poll(lambda: len(late_entries(r)) == 2, timeout=20, what="the two lost plans recorded by the sweeper")
    poll(lambda: "sweeper freed 1 lease(s) it could not read: poison" in w.output(), what="the poisoned lease reported")
    assert {e["recorded_by"] for e in late_entries(r)} == {"sweep"} and inflight(r) == 0
    assert_counters_match_the_stream(r)
