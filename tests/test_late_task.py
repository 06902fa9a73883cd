"""The late task against a real worker process: found, timeout, parse_error, stale, rejected, many plans."""

from __future__ import annotations

import threading
import time
from collections import Counter

import redis

from observer_tasks import observe_late
from observer_tasks.tasks import late_observe

from .conftest import Worker, inflight, late_entries, poll

HEAT = "quantum:harvest:heat:by_plan:"


def one_entry(r: redis.Redis, plan: str) -> dict[str, str]:
    entries = poll(lambda: [e for e in late_entries(r) if e["plan_id"] == plan], what=f"entry for {plan}")
    assert len(entries) == 1
    return entries[0]


def test_found_after_a_few_polls(r: redis.Redis, worker: Worker) -> None:
    assert observe_late("p1", "BTCUSDT", "EXECUTE") == "enqueued"
    timer = threading.Timer(0.2, r.hset, (HEAT + "p1",), {"mapping": {"heat_level": "hot", "heat_action": "NONE"}})
    timer.start()
    entry = one_entry(r, "p1")
    timer.join()
    assert (entry["heat_found"], entry["heat_reason"], entry["heat_level"], entry["apply_decision"]) == (
        "1", "ok", "hot", "EXECUTE")
    assert int(entry["polls"]) >= 2 and 200 <= int(entry["wait_ms"]) < 600
    poll(lambda: inflight(r) == 0, what="lease released")


def test_timeout_after_max_wait(r: redis.Redis, worker: Worker) -> None:
    started = time.time()
    assert observe_late("p1", "BTCUSDT") == "enqueued"
    entry = one_entry(r, "p1")
    assert (entry["heat_found"], entry["heat_reason"]) == ("0", "timeout")
    assert 600 <= int(entry["wait_ms"]) <= 600 + 50 + 500  # the deadline, plus at most one poll and some slack
    assert float(entry["ts_epoch"]) - started >= 0.6
    assert int(entry["polls"]) >= 5
    assert inflight(r) == 0


def test_wrong_type_is_a_parse_error(r: redis.Redis, worker: Worker) -> None:
    r.sadd(HEAT + "p1", "member")
    observe_late("p1", "BTCUSDT")
    entry = one_entry(r, "p1")
    assert (entry["heat_found"], entry["heat_reason"], entry["polls"]) == ("0", "parse_error", "1")
    assert "WRONGTYPE" in entry["debug_json"]


def test_stale_message_records_timeout_without_looking(r: redis.Redis, worker: Worker) -> None:
    r.hset(HEAT + "p1", "heat_level", "hot")  # present, but the message comes too late to count it
    now = int(time.time() * 1000)
    late_observe.apply_async(args=("p1", "BTCUSDT", "", now - 5000, now - 3000), queue="late_obs")
    entry = one_entry(r, "p1")
    assert (entry["heat_reason"], entry["polls"]) == ("timeout", "0")
    assert "late" in entry["debug_json"]


def test_duplicate_delivery_yields_one_entry(r: redis.Redis, worker: Worker) -> None:
    assert observe_late("p1", "BTCUSDT") == "enqueued"
    assert observe_late("p1", "BTCUSDT") == "duplicate"
    now = int(time.time() * 1000)
    late_observe.apply_async(args=("p1", "BTCUSDT", "", now, now + 300), queue="late_obs")
    r.hset(HEAT + "p1", "heat_level", "cold")
    one_entry(r, "p1")
    # Both messages run to their end; still one entry, one count.
    poll(lambda: inflight(r) == 0 and r.llen("late_obs") == 0, what="all messages done")
    assert int(r.hget("quantum:p28:counters", "observed|publish_plan_post|1") or 0) + int(
        r.hget("quantum:p28:counters", "observed|publish_plan_post|0") or 0) == 1


def test_bad_messages_are_rejected_and_release_the_lease(r: redis.Redis, worker: Worker) -> None:
    observe_late("p1", "BTCUSDT")
    now = int(time.time() * 1000)
    late_observe.apply_async(args=("p1",), queue="late_obs")  # missing arguments
    late_observe.apply_async(args=("p2", "BTCUSDT", "", "soon", now), queue="late_obs")  # mistyped
    late_observe.apply_async(args=("p3", "BTCUSDT", "", now, now + 10**9), queue="late_obs")  # far future
    late_observe.apply_async(args=("a*b", "BTCUSDT", "", now, now + 100), queue="late_obs")  # bad plan id
    poll(lambda: worker.output().count("rejected late_observe message") >= 4, what="four rejections logged")
    out = worker.output()
    assert "bad task arguments" in out and "published_ms='soon'" in out and "too far in the future" in out
    assert "plan_id 'a*b'" in out
    poll(lambda: inflight(r) == 0, what="p1's lease released by the rejection")
    assert "Traceback" not in out


def test_many_plans_each_recorded_once(r: redis.Redis, worker: Worker) -> None:
    plans = [f"m{i}" for i in range(60)]
    for i, plan in enumerate(plans):
        assert observe_late(plan, "BTCUSDT") == "enqueued"
        if i % 3 == 0:
            r.hset(HEAT + plan, "heat_level", "warm")
    poll(lambda: len(late_entries(r)) >= len(plans) and inflight(r) == 0, timeout=30, what="all plans recorded")
    entries = late_entries(r)
    assert sorted(e["plan_id"] for e in entries) == sorted(plans)
    reasons = Counter(e["heat_reason"] for e in entries)
    assert reasons == {"ok": 20, "timeout": 40}
