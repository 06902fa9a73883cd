"""Faults injected for real: paused and restarted Redis, killed workers, dead brokers."""

from __future__ import annotations

import signal
import threading
import time

import redis

from observer_tasks import observe_late

from .conftest import PrivateRedis, poll


def test_lookups_that_fail_twice_end_as_redis_error(env: dict[str, str], amqp_broker: str,
                                                   private_redis: PrivateRedis, start_worker) -> None:  # type: ignore[no-untyped-def]
    """The heat store stops answering (a paused process): lookups time out, the plan ends as redis_error."""
    env["REDIS_URL"] = private_redis.url
    env["P28_LATE_OBS_MAX_WAIT_MS"] = "3000"
    worker = start_worker()
    r = redis.Redis.from_url(private_redis.url)
    assert observe_late("p1", "BTCUSDT") == "enqueued"
    assert private_redis.proc is not None
    private_redis.proc.send_signal(signal.SIGSTOP)
    paused_at = time.monotonic()
    resume = threading.Timer(1.5, private_redis.proc.send_signal, (signal.SIGCONT,))
    resume.start()
    entry = poll(lambda: r.xrange("quantum:stream:apply.heat.observed"), timeout=20, what="the entry")
    resume.join()
    assert len(entry) == 1
    fields = {k.decode(): v.decode() for k, v in entry[0][1].items()}
    assert fields["heat_reason"] == "redis_error" and fields["heat_found"] == "0"
    assert time.monotonic() - paused_at < 3.0 + 1.0  # ended near the outage, not at some later sweep
    # The worker is not wedged: the next plan is observed normally.
    r.hset("quantum:harvest:heat:by_plan:p2", "heat_level", "hot")
    assert observe_late("p2", "BTCUSDT") == "enqueued"
    poll(lambda: r.xlen("quantum:stream:apply.heat.observed") == 2, timeout=20, what="the next plan")
    assert worker.proc.poll() is None
