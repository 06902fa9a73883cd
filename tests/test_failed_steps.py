"""A step that fails writes nothing: the plan stays leased and is recorded exactly once when the cause is gone;
a poisoned lease never blocks the sweep. Real Redis; the last two with a real worker."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable

import pytest
import redis

from observer_tasks import observe_late
from observer_tasks.core import keys as K
from observer_tasks.core.settings import SWEEP_BATCH, Settings
from observer_tasks.core.store import Store, redis_client

from .conftest import DATA_URL, Worker, inflight, late_entries, poll, stream_entries

HEAT = "quantum:harvest:heat:by_plan:"
STREAM = "quantum:stream:apply.heat.observed"


def make_store(env: dict[str, str], **overrides: str) -> Store:
    return Store(Settings.from_env({**env, **overrides}), redis_client(DATA_URL, 1.0, "test"))


def counts(r: redis.Redis) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in r.hgetall(K.COUNTERS).items()}


def counters_match_the_stream(r: redis.Redis) -> None:
    """observed|... and reason|... counters equal what the stream holds, exactly."""
    expected: Counter[str] = Counter()
    for e in stream_entries(r):
        expected[K.Keys.observed_field(e["obs_point"], e["heat_found"])] += 1
        expected[K.Keys.reason_field(e["obs_point"], e["heat_reason"])] += 1
    got = {k: v for k, v in counts(r).items() if k.startswith((K.OBSERVED + "|", K.REASON + "|"))}
    assert got == dict(expected)


def overdue(r: redis.Redis, plan: str, by_ms: int = 60_000) -> None:
    """Move a lease back in time, so its deadline + grace passed by_ms ago."""
    lease = json.loads(r.hget(K.LEASES, plan))  # type: ignore[arg-type]
    lease["published_ms"] -= by_ms
    lease["deadline_ms"] -= by_ms
    r.hset(K.LEASES, plan, json.dumps(lease))
    r.zadd(K.INFLIGHT, {plan: lease["deadline_ms"] + 5000})


def test_a_wrong_type_stream_fails_every_step_without_a_write(r: redis.Redis, env: dict[str, str]) -> None:
    store = make_store(env)
    for plan in ("looked", "woken", "finished", "swept"):
        assert store.admit(plan, "BTCUSDT", "EXECUTE").status == "admitted"
    r.hset(HEAT + "looked", "heat_level", "hot")
    r.hset(HEAT + "woken", "heat_level", "warm")
    r.hset(HEAT + "early", "heat_level", "cold")
    overdue(r, "swept")
    r.set(STREAM, "not a stream")  # an operator's mistake, another tool
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        store.look("looked", 1, 0)
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        store.finish("finished", "redis_error", {"polls": 2})
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        store.observe_early("early", "BTCUSDT", "")
    woken = store.wake(["woken"])
    assert woken == {} and "WRONGTYPE" in woken.skipped["woken"]
    swept = store.sweep([])
    assert swept.recorded == 0 and "WRONGTYPE" in swept.skipped["swept"]
    # Nothing written: every lease kept, no dedupe key, no counter moved.
    assert r.hlen(K.LEASES) == 4 and inflight(r) == 4
    assert not r.keys("quantum:dedupe:*") and counts(r) == {}

    r.delete(STREAM)  # the cause fixed: each plan recorded once, by the step that runs next
    assert store.observe_early("early", "BTCUSDT", "") == "ok"
    assert store.look("looked", 2, 0).reason == "ok"
    assert store.wake(["woken"])["woken"].reason == "ok"
    assert store.finish("finished", "redis_error", {"polls": 2}).status == "recorded"
    assert store.sweep([]).recorded == 1
    woken = store.wake(["woken"])
    assert store.sweep([]).recorded == 0 and (woken, woken.skipped) == ({}, {})
    assert store.look("looked", 3, 0).status == "gone"
    assert sorted(e["plan_id"] for e in stream_entries(r)) == ["early", "finished", "looked", "swept", "woken"]
    assert inflight(r) == 0 and r.hlen(K.LEASES) == 0
    counters_match_the_stream(r)


@pytest.mark.parametrize("corrupt", ["a set", "not a number"])
def test_corrupt_counters_fail_before_the_entry(r: redis.Redis, env: dict[str, str], corrupt: str) -> None:
    store = make_store(env)
    store.admit("p1", "BTCUSDT", "")
    r.hset(HEAT + "p1", "heat_level", "hot")
    if corrupt == "a set":
        r.sadd(K.COUNTERS, "x")
    else:
        r.hset(K.COUNTERS, K.Keys.reason_field(K.OBS_LATE, "ok"), "many")
    with pytest.raises(redis.ResponseError):
        store.look("p1", 1, 0)
    assert not r.exists(STREAM) and r.hexists(K.LEASES, "p1")
    r.delete(K.COUNTERS)
    assert store.look("p1", 2, 0).reason == "ok"
    assert len(late_entries(r)) == 1
    counters_match_the_stream(r)


def test_poisoned_leases_never_block_the_sweep(r: redis.Redis, env: dict[str, str]) -> None:
    store = make_store(env)
    for plan in ("good1", "good2", "badfields"):
        store.admit(plan, "ETHUSDT", "SKIP")
        overdue(r, plan)
    # Leases that broke the sweep script (and so every sweep behind them), or that no admission writes.
    lease = json.loads(r.hget(K.LEASES, "badfields"))  # type: ignore[arg-type]
    r.hset(K.LEASES, "badfields", json.dumps({**lease, "symbol": {"x": 1}, "apply_decision": [True]}))
    poisoned = {"notjson": "{", "array": "[1, 2]", "infinite": '{"published_ms": 1e999, "deadline_ms": 1e999}',
                "a:b": json.dumps(lease)}
    for plan, raw in poisoned.items():
        r.hset(K.LEASES, plan, raw)
        r.zadd(K.INFLIGHT, {plan: 1})
    swept = store.sweep([])
    assert (swept.recorded, sorted(swept.freed), swept.skipped) == (3, sorted(poisoned), {})
    entries = {e["plan_id"]: e for e in late_entries(r)}
    assert sorted(entries) == ["badfields", "good1", "good2"]
    assert (entries["badfields"]["symbol"], entries["badfields"]["apply_decision"]) == ("", "")
    assert inflight(r) == 0 and r.hlen(K.LEASES) == 0
    counters_match_the_stream(r)


def test_skipped_plans_are_passed_over_page_by_page(r: redis.Redis, env: dict[str, str]) -> None:
    """More overdue plans than one sweep step takes, every record failing: all reported, none written; then
    once the cause is fixed, every one recorded exactly once."""
    store = make_store(env)
    plans = [f"p{i}" for i in range(SWEEP_BATCH + 5)]
    for plan in plans:
        store.admit(plan, "BTCUSDT", "")
        overdue(r, plan)
    r.set(STREAM, "x")
    swept = store.sweep([])
    assert swept.recorded == 0 and sorted(swept.skipped) == sorted(plans)
    assert inflight(r) == len(plans) and counts(r) == {}
    r.delete(STREAM)
    assert store.sweep([]).recorded == len(plans)
    assert Counter(e["plan_id"] for e in late_entries(r)) == Counter(plans)
    counters_match_the_stream(r)


@pytest.mark.slow
def test_wrong_type_stream_with_a_worker(r: redis.Redis, worker: Worker) -> None:
    """Three admitted plans while the stream's key holds a string: nothing lost; recorded once after the fix."""
    r.set(STREAM, "an operator's mistake")
    for plan in ("p1", "p2", "p3"):
        assert observe_late(plan, "BTCUSDT", "EXECUTE") == "enqueued"
    r.hset(HEAT + "p1", "heat_level", "hot")
    poll(lambda: worker.output().count("could not record plan") >= 3, what="three failed records logged")
    poll(lambda: "sweeper could not record 3 overdue plan(s)" in worker.output(), timeout=20,
         what="the sweeper reports the plans it cannot record")
    assert r.hlen(K.LEASES) == 3 and r.type(STREAM) == b"string" and counts(r).get(
        K.Keys.observed_field(K.OBS_LATE, "0")) is None
    assert "the sweeper will record it" not in worker.output()
    r.delete(STREAM)
    entries = poll(lambda: len(late_entries(r)) >= 3 and late_entries(r), what="three entries after the fix")
    assert sorted(e["plan_id"] for e in entries) == ["p1", "p2", "p3"]
    for e in entries:  # p1 has heat: a wake resync (another database's FLUSHDB on a shared server) may take it
        assert e["recorded_by"] in (("sweep", "wake") if e["plan_id"] == "p1" else ("sweep",))
        assert e["heat_reason"] == "timeout" and "WRONGTYPE" in json.loads(e["debug_json"])["failed"]
    poll(lambda: inflight(r) == 0, what="leases removed")
    assert len(late_entries(r)) == 3 and not r.hkeys(K.UNSENT)
    counters_match_the_stream(r)


@pytest.mark.slow
def test_poisoned_lease_in_the_sweep_with_a_worker(r: redis.Redis, env: dict[str, str],
                                                  start_worker: Callable[..., Worker]) -> None:
    store = make_store(env)
    for plan in ("lost1", "lost2"):  # admitted, their messages never sent: only the sweeper can record them
        store.admit(plan, "BTCUSDT", "")
    r.hset(K.LEASES, "poison", '{"published_ms": "soon"}')
    r.zadd(K.INFLIGHT, {"poison": 1})
    w = start_worker()
    poll(lambda: len(late_entries(r)) == 2, timeout=20, what="the two lost plans recorded by the sweeper")
    poll(lambda: "sweeper freed 1 lease(s) it could not read: poison" in w.output(), what="the poisoned lease reported")
    assert {e["recorded_by"] for e in late_entries(r)} == {"sweep"} and inflight(r) == 0
    counters_match_the_stream(r)
