"""Admission to late observation: the inflight bound, drops, duplicates, expiring leases (real Redis)."""

from __future__ import annotations

import base64
import json

import redis

from observer_tasks import observe_late
from observer_tasks.core.settings import Settings
from observer_tasks.core.store import Store, redis_client

from .conftest import DATA_URL, inflight, poll

INFLIGHT = "quantum:p28:late_obs:inflight"


def counters(r: redis.Redis) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in r.hgetall("quantum:p28:counters").items()}


def redis_ms(r: redis.Redis) -> int:
    sec, usec = r.time()
    return int(sec) * 1000 + int(usec) // 1000


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
    assert observe_late("p2", "BTCUSDT") == "enqueued"
    # The publisher sends in order: once p2's message is there, p1's duplicate would be too.
    poll(lambda: broker.llen("late_obs") >= 2, 5, what="messages in late_obs")
    bodies = [json.loads(m)["headers"]["id"] for m in broker.lrange("late_obs", 0, -1)]
    assert sorted(bodies) == ["p28-late-p1", "p28-late-p2"]
    assert inflight(r) == 2 and "dropped" not in counters(r)


def test_expired_leases_hold_no_slot_but_stay_in_the_ledger(r: redis.Redis, env: dict[str, str]) -> None:
    store = Store(Settings.from_env({**env, "P28_LATE_OBS_MAX_INFLIGHT": "2"}), redis_client(DATA_URL, 1.0, "test"))
    assert [store.admit(p, "BTCUSDT", "").status for p in ("old1", "old2")] == ["admitted", "admitted"]
    for plan in ("old1", "old2"):  # their lease ends passed (Redis time), as after a crash nobody recorded
        r.zadd(INFLIGHT, {plan: redis_ms(r) - 1000})
    assert [store.admit(f"new{i}", "BTCUSDT", "").status for i in range(3)] == ["admitted", "admitted", "dropped"]
    assert inflight(r) == 4  # the two stale leases wait for the sweeper
    assert r.hexists("quantum:p28:late_obs:leases", "old1") and r.hexists("quantum:p28:late_obs:leases", "old2")


def test_lease_ends_grace_after_the_deadline_on_redis_time(r: redis.Redis, env: dict[str, str]) -> None:
    settings = Settings.from_env()
    store = Store(settings, redis_client(DATA_URL, 1.0, "test"))
    before = redis_ms(r)
    admission = store.admit("p1", "ETHUSDT", "SKIP")
    after = redis_ms(r)
    assert admission.status == "admitted" and before <= admission.published_ms <= after
    assert admission.deadline_ms - admission.published_ms == settings.late_obs_max_wait_ms
    assert r.zscore(INFLIGHT, "p1") == admission.deadline_ms + settings.sweep_grace_ms
    lease = json.loads(r.hget("quantum:p28:late_obs:leases", "p1") or "")
    assert (lease["symbol"], lease["apply_decision"]) == ("ETHUSDT", "SKIP")
    assert (lease["published_ms"], lease["deadline_ms"]) == (admission.published_ms, admission.deadline_ms)
    assert store.admit("p1", "ETHUSDT", "SKIP").status == "duplicate"


def test_message_carries_the_admission_times(r: redis.Redis, env: dict[str, str]) -> None:
    broker = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    assert observe_late("p1", "ETHUSDT", "skip") == "enqueued"
    raw = poll(lambda: broker.lindex("late_obs", 0), 5, what="the message")
    lease = json.loads(r.hget("quantum:p28:late_obs:leases", "p1") or "")
    args = json.loads(base64.b64decode(json.loads(raw)["body"]))[0]
    assert args == ["p1", "ETHUSDT", "SKIP", lease["published_ms"], lease["deadline_ms"]]


def test_disabled_switch(r: redis.Redis, env: dict[str, str]) -> None:
    env["P28_LATE_OBS_ENABLED"] = "off"
    assert observe_late("p1", "BTCUSDT") == "disabled"
    assert inflight(r) == 0 and redis.Redis.from_url(env["CELERY_BROKER_URL"]).llen("late_obs") == 0


def test_a_retried_admission_finds_its_own_lease_and_a_late_one_keeps_its_publish_time(
        r: redis.Redis, env: dict[str, str]) -> None:
    """A caller's admission whose reply was lost is retried by the thread with the same token: 'admitted' with
    the first lease's times (its message is then sent), never a 'duplicate' left to the sweeper."""
    settings = Settings.from_env()
    store = Store(settings, redis_client(DATA_URL, 1.0, "test"))
    first = store.admit("p1", "BTCUSDT", "EXECUTE", token="tok-1")
    assert first.status == "admitted"
    assert store.admit("p1", "BTCUSDT", "EXECUTE", token="tok-1") == first
    assert store.admit("p1", "BTCUSDT", "EXECUTE", token="tok-2").status == "duplicate"
    assert store.admit("p1", "BTCUSDT", "EXECUTE").status == "duplicate"
    # Deferred 700 ms in the producer: published that much before Redis's now, the deadline with it.
    before = redis_ms(r)
    late = store.admit("p2", "BTCUSDT", "EXECUTE", token="tok-3", age_ms=700)
    assert late.status == "admitted" and before - 700 <= late.published_ms <= redis_ms(r) - 700
    assert late.deadline_ms - late.published_ms == settings.late_obs_max_wait_ms


def test_settle_counts_a_lost_call_once_and_only_if_redis_never_did_it(r: redis.Redis, env: dict[str, str]) -> None:
    """A call given up on after its reply was lost: settled against what Redis did, so a plan is never both
    recorded and counted as refused, and the lost attempt cannot land afterwards."""
    settings = Settings.from_env()
    store = Store(settings, redis_client(DATA_URL, 1.0, "test"))
    done = store.admit("done", "BTCUSDT", "", token="t-done")
    store.observe_early("early-done", "BTCUSDT", "")
    out = store.settle([("publish_plan_post", "done", "t-done"), ("publish_plan_post", "never", "t-never"),
                        ("create_apply_plan", "early-done", ""), ("create_apply_plan", "early-never", "")])
    assert [o.status for o in out] == ["admitted", "refused", "duplicate", "refused"]
    assert (out[0].published_ms, out[0].deadline_ms) == (done.published_ms, done.deadline_ms)
    # The settled-as-refused calls cannot happen any more: the lost attempt, if it lands now, is a duplicate.
    assert store.admit("never", "BTCUSDT", "", token="t-never").status == "duplicate"
    assert store.observe_early("early-never", "BTCUSDT", "") == "duplicate"
