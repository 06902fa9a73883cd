"""Admission to late observation: the inflight bound, drops, duplicates, expiring leases (real Redis)."""

from __future__ import annotations

import time

import redis

from observer_tasks import observe_late
from observer_tasks.settings import SWEEP_GRACE_MS, Settings
from observer_tasks.store import LeasePayload, Store, redis_client

from .conftest import DATA_URL, inflight


def counters(r: redis.Redis) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in r.hgetall("quantum:p28:counters").items()}


def test_drops_beyond_max_inflight_are_counted_exactly(r: redis.Redis, env: dict[str, str]) -> None:
    env["P28_LATE_OBS_MAX_INFLIGHT"] = "5"
    results = [observe_late(f"plan{i}", "BTCUSDT", "EXECUTE") for i in range(8)]
    assert results == ["enqueued"] * 5 + ["dropped"] * 3
    assert counters(r)["dropped"] == 3
    assert inflight(r) == 5


def test_second_call_for_an_admitted_plan_sends_nothing(r: redis.Redis, env: dict[str, str]) -> None:
    broker = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    assert observe_late("p1", "BTCUSDT") == "enqueued"
    assert observe_late("p1", "BTCUSDT") == "duplicate"
    assert broker.llen("late_obs") == 1
    assert inflight(r) == 1 and "dropped" not in counters(r)


def test_expired_leases_hold_no_slot_but_stay_in_the_ledger(r: redis.Redis, env: dict[str, str]) -> None:
    settings = Settings.from_env({**env, "P28_LATE_OBS_MAX_INFLIGHT": "2"})
    store = Store(settings, redis_client(DATA_URL, 1.0))
    now = int(time.time() * 1000)
    stale = LeasePayload("BTCUSDT", "", now - 60_000, now - SWEEP_GRACE_MS - 1)
    assert store.admit("old1", stale) == "admitted"
    assert store.admit("old2", stale) == "admitted"
    fresh = LeasePayload("BTCUSDT", "", now, now + 2000)
    assert [store.admit(f"new{i}", fresh) for i in range(3)] == ["admitted", "admitted", "dropped"]
    assert inflight(r) == 4  # the two stale leases wait for the sweeper
    assert [plan for plan, _ in store.overdue_leases(now)] == ["old1", "old2"]


def test_lease_ends_shortly_after_the_deadline(r: redis.Redis, env: dict[str, str]) -> None:
    before = int(time.time() * 1000)
    assert observe_late("p1", "ETHUSDT", "SKIP") == "enqueued"
    score = r.zscore("quantum:p28:late_obs:inflight", "p1")
    assert score is not None
    wait = int(env["P28_LATE_OBS_MAX_WAIT_MS"])
    assert before + wait + SWEEP_GRACE_MS <= score <= int(time.time() * 1000) + wait + SWEEP_GRACE_MS
    payload = LeasePayload.loads(r.hget("quantum:p28:late_obs:leases", "p1"))
    assert payload is not None and payload.symbol == "ETHUSDT" and payload.apply_decision == "SKIP"
    assert payload.deadline_ms - payload.published_ms == wait


def test_disabled_switch(r: redis.Redis, env: dict[str, str]) -> None:
    env["P28_LATE_OBS_ENABLED"] = "off"
    assert observe_late("p1", "BTCUSDT") == "disabled"
    assert inflight(r) == 0 and redis.Redis.from_url(env["CELERY_BROKER_URL"]).llen("late_obs") == 0
