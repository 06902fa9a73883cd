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

from .conftest import PrivateRedis, Worker, inflight, late_entries, poll
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
            conn.channel().queue_delete("late_obs")  # a broker that has never seen the observer: nothing declared
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
        dropped = int(r.hget("quantum:p28:counters", "dropped") or 0)
        return len(late_entries(r)) + dropped >= 500 and inflight(r) == 0

    poll(settled, 60, 0.2, "every admitted plan recorded")
    entries = late_entries(r)
    counts = {k.decode(): int(v) for k, v in r.hgetall("quantum:p28:counters").items()}
    assert len(entries) == MAX_INFLIGHT and len({e["plan_id"] for e in entries}) == MAX_INFLIGHT
    assert counts["dropped"] == 500 - MAX_INFLIGHT
    assert tally["dropped"] <= counts["dropped"] <= tally["dropped"] + tally["deferred"]
    assert {e["plan_id"] for e in entries} >= {f"b{i}" for i, res in enumerate(results) if res == "enqueued"}
    assert not [k for k in counts if k.startswith("refused|")], counts
    assert {e["recorded_by"] for e in entries} <= {"look", "wake"}  # every first message was sent
    assert worker.proc.poll() is None
