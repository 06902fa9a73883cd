"""Recording an observation: one atomic step, at most once per plan and point (real Redis)."""

from __future__ import annotations

import time

import redis

from observer_tasks.heat import Heat
from observer_tasks.settings import Settings
from observer_tasks.store import LeasePayload, Store, redis_client
from observer_tasks.sweeper import sweep_once

from .conftest import DATA_URL, inflight, late_entries, stream_entries


def make_store(env: dict[str, str], **overrides: str) -> Store:
    return Store(Settings.from_env({**env, **overrides}), redis_client(DATA_URL, 1.0))


def record(store: Store, plan: str, reason: str = "timeout", point: str = "publish_plan_post") -> bool:
    return store.record(plan_id=plan, symbol="BTCUSDT", obs_point=point, heat=Heat(False, ""), reason=reason,
                        apply_decision="EXECUTE", debug={"note": "x" * 1000})


def test_second_record_writes_nothing(r: redis.Redis, env: dict[str, str]) -> None:
    store = make_store(env)
    assert record(store, "p1") is True
    assert record(store, "p1", reason="ok") is False
    assert record(store, "p1", point="create_apply_plan", reason="missing") is True
    entries = stream_entries(r)
    assert [(e["obs_point"], e["heat_reason"]) for e in entries] == [("publish_plan_post", "timeout"),
                                                                   ("create_apply_plan", "missing")]
    counts = {k.decode(): int(v) for k, v in r.hgetall("quantum:p28:counters").items()}
    assert counts == {"observed|publish_plan_post|0": 1, "reason|publish_plan_post|timeout": 1,
                      "observed|create_apply_plan|0": 1, "reason|create_apply_plan|missing": 1}
    assert 0 < r.ttl("quantum:dedupe:p28:publish_plan_post:p1") <= 600


def test_record_releases_the_late_lease_only(r: redis.Redis, env: dict[str, str]) -> None:
    store = make_store(env)
    now = int(time.time() * 1000)
    assert store.admit("p1", LeasePayload("BTCUSDT", "", now, now + 500)) == "admitted"
    record(store, "p1", point="create_apply_plan", reason="missing")
    assert inflight(r) == 1
    record(store, "p1")
    assert inflight(r) == 0 and r.hlen("quantum:p28:late_obs:leases") == 0


def test_debug_json_is_capped(r: redis.Redis, env: dict[str, str]) -> None:
    store = make_store(env, P28_MAX_DEBUG_CHARS="50")
    record(store, "p1")
    assert len(stream_entries(r)[0]["debug_json"]) <= 50


def test_sweeper_records_overdue_leases_once(r: redis.Redis, env: dict[str, str]) -> None:
    store = make_store(env)
    now = int(time.time() * 1000)
    store.admit("lost", LeasePayload("ETHUSDT", "SKIP", now - 10_000, now - 8_000))
    store.admit("live", LeasePayload("ETHUSDT", "SKIP", now, now + 2_000))
    assert sweep_once(store, now) == 1
    assert sweep_once(store, now) == 0
    (entry,) = late_entries(r)
    assert (entry["plan_id"], entry["heat_reason"], entry["symbol"], entry["apply_decision"]) == (
        "lost", "timeout", "ETHUSDT", "SKIP")
    assert '"swept":true' in entry["debug_json"]
    assert int(r.hget("quantum:p28:counters", "recovered") or 0) == 1
    assert inflight(r) == 1  # the live lease is untouched


def test_lua_scripts_are_loadable_with_redis_cli(r: redis.Redis) -> None:
    import subprocess
    from pathlib import Path

    script = Path(__file__).parent.parent / "observer_tasks" / "redis_scripts" / "release.lua"
    out = subprocess.run(["redis-cli", "-n", DATA_URL.rsplit("/", 1)[1], "--eval", str(script),
                          "quantum:p28:late_obs:inflight", "quantum:p28:late_obs:leases", ",", "nothing"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


def test_sweeper_records_redis_error_when_it_saw_an_outage(r: redis.Redis, env: dict[str, str]) -> None:
    store = make_store(env)
    now = int(time.time() * 1000)
    store.admit("during", LeasePayload("BTCUSDT", "", now - 10_000, now - 8_000))
    store.admit("before", LeasePayload("BTCUSDT", "", now - 30_000, now - 28_000))
    assert sweep_once(store, now, outages=[(now - 9_000, now - 7_500)]) == 2
    reasons = {e["plan_id"]: e["heat_reason"] for e in late_entries(r)}
    assert reasons == {"during": "redis_error", "before": "timeout"}
