"""Bursts on every broker (issue 19): 500 observe_late calls in well under a second, while the worker is still
starting (and, in one case, through a 1 s Redis stall), are admitted up to MAX_INFLIGHT and the rest dropped
and counted; no call is an error while Redis and the broker are healthy; every call is accounted exactly."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest
import redis

from observer_tasks import observe, observe_late
from observer_tasks.core.messages import QUEUE

from .conftest import PrivateRedis, Worker, assert_exactly_once, counters, inflight, late_entries, notes, poll
from .test_stall import BUSY

MAX_INFLIGHT = 200


@pytest.mark.slow
@pytest.mark.parametrize("stall", [False, True], ids=["healthy", "stall"])
@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_a_burst_is_admitted_up_to_max_inflight_and_the_rest_dropped_and_counted(
        request: pytest.FixtureRequest, env: dict[str, str], private_redis: PrivateRedis,
        start_worker: Callable[..., Worker], broker: str, stall: bool) -> None:
    # No heat and a 3 s window: no lease ends before the burst does, so exactly MAX_INFLIGHT are admitted.
    env.update(REDIS_URL=private_redis.url, P28_LATE_OBS_MAX_WAIT_MS="3000", P28_LATE_OBS_POLL_MS="100",
               P28_LATE_OBS_MAX_INFLIGHT=str(MAX_INFLIGHT))
    if broker == "amqp":
        from kombu import Connection

        request.getfixturevalue("amqp_broker")
        with Connection(env["CELERY_BROKER_URL"], connect_timeout=5) as conn:
            conn.channel().queue_delete(QUEUE)  # a broker that has never seen the observer: nothing declared
    else:
        env["CELERY_BROKER_URL"] = private_redis.url.replace("/0", "/1")
    r = redis.Redis(port=private_redis.port)
    assert observe("warm-up", "BTCUSDT") == "missing"
    worker = start_worker(wait=False)  # the burst comes while it starts
    staller = threading.Thread(target=lambda: redis.Redis(port=private_redis.port).eval(BUSY, 0, 1000), daemon=True)

    results = []
    start = time.monotonic()
    for i in range(500):
        if stall and i == 100:
            staller.start()
        results.append(observe_late(f"b{i}", "BTCUSDT", "EXECUTE"))
    took = time.monotonic() - start
    tally = Counter(results)
    print(f"\n500 calls on {broker}{' through a 1 s stall' if stall else ''} in {took * 1000:.0f} ms: {dict(tally)}")
    assert set(tally) <= {"enqueued", "dropped", "deferred"}, tally  # never an error
    if stall:
        staller.join(10)
        assert tally["deferred"] > 0
    worker.wait_ready()

    # Every call accounted for exactly: an entry for each admitted plan (a timeout at its deadline: no heat),
    # a count for each dropped one; nothing refused, nothing left to the sweeper.
    def settled() -> bool:
        return len(late_entries(r)) + counters(r)("p28_late_obs_dropped") >= 500 and inflight(r) == 0

    poll(settled, 60, 0.2, "every admitted plan recorded")
    entries = late_entries(r)
    counts = counters(r)
    assert len(entries) == MAX_INFLIGHT
    assert_exactly_once(r, sorted({e["plan_id"] for e in entries}))
    assert counts("p28_late_obs_dropped") == 500 - MAX_INFLIGHT
    assert tally["dropped"] <= counts("p28_late_obs_dropped") <= tally["dropped"] + tally["deferred"]
    assert {e["plan_id"] for e in entries} >= {f"b{i}" for i, res in enumerate(results) if res == "enqueued"}
    assert not [k for k, v in counts.items() if k[0] == "p28_observe_refused" and v], counts
    # Every first message was sent: no entry says otherwise. (The sweeper may decide plans of a worker still
    # starting: its grace is now max(1000, POLL_MS + 500) ms, was 5 s, and it decides by the same rule as a look,
    # round-4 migration change 2: a timeout either way, no heat.)
    assert {e["recorded_by"] for e in entries} <= {"look", "wake", "sweep"}
    assert not [e for e in entries if "unsent" in e["debug_json"]] and not len(notes(r))
    # No heat: a timeout; through the stall, a plan whose look failed in it may be redis_error (change 2).
    assert {e["heat_reason"] for e in entries} <= ({"timeout", "redis_error"} if stall else {"timeout"})
    assert worker.proc.poll() is None
