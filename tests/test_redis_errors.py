"""Redis refusing to answer (BUSY, READONLY, OOM) is an outage, never a bad record: real spells on a private
redis-server holding the observer's data (the broker is RabbitMQ, so only the data store is refusing)."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import redis

from observer_tasks import observe, observe_late
from observer_tasks.core import contract as C
from observer_tasks.core.settings import LATE_POINT, Settings

from .conftest import HEAT, STREAM, PrivateRedis, Worker, assert_counters_match_the_stream, free_port, poll
from .timing import hold

EARLY = Settings().early_points[0]
SPELL_S = 1.5
BUSY_SCRIPT = """
local t = redis.call('TIME')
local stop = tonumber(t[1]) * 1e6 + tonumber(t[2]) + tonumber(ARGV[1])
repeat t = redis.call('TIME') until tonumber(t[1]) * 1e6 + tonumber(t[2]) >= stop
"""


@contextmanager
def busy(admin: redis.Redis) -> Iterator[None]:
    """Another client runs a script for SPELL_S: every other command gets BUSY meanwhile."""
    admin.config_set("busy-reply-threshold", 100)
    runner = threading.Thread(target=redis.Redis(port=admin.connection_pool.connection_kwargs["port"],
                                                 socket_timeout=30).eval, args=(BUSY_SCRIPT, 0, int(SPELL_S * 1e6)))
    runner.start()
    poll(lambda: _refused(admin, "BUSY"), timeout=2, interval=0.01, what="BUSY replies")
    yield
    runner.join()


@contextmanager
def readonly(admin: redis.Redis) -> Iterator[None]:
    """The server becomes a replica of a master that never answers: writes get READONLY, data stays."""
    admin.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
    yield
    hold(SPELL_S, "the spell's length: nothing to poll for, the spell is the wait")
    admin.execute_command("REPLICAOF", "NO", "ONE")


@contextmanager
def oom(admin: redis.Redis) -> Iterator[None]:
    """maxmemory far below what is used, with noeviction: every write (and every script) gets OOM."""
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)
    yield
    hold(SPELL_S, "the spell's length")
    admin.config_set("maxmemory", 0)


def _refused(client: redis.Redis, reply: str) -> bool:
    try:
        redis.Redis(port=client.connection_pool.connection_kwargs["port"], socket_timeout=1).set("probe", 1)
    except redis.ResponseError as exc:
        return str(exc).startswith(reply)
    return False


SPELLS: dict[str, Callable[[redis.Redis], object]] = {"BUSY": busy, "READONLY": readonly, "OOM": oom}


@pytest.mark.parametrize("reply", list(SPELLS))
def test_refusing_redis_is_an_outage(env: dict[str, str], amqp_broker: str, private_redis: PrivateRedis,
                                     start_worker: Callable[..., Worker], caplog: pytest.LogCaptureFixture,
                                     reply: str) -> None:
    # The plans' deadline falls inside the spell: their last look (BUSY) or their timeout record (READONLY:
    # reads still work there; OOM: a record's first write is its entry, which Redis refuses) is refused, and
    # each must end as redis_error, never timeout or parse_error.
    env.update({"REDIS_URL": private_redis.url, "P28_LATE_OBS_MAX_WAIT_MS": "1000", "P28_LATE_OBS_POLL_MS": "100"})
    worker = start_worker()
    r = redis.Redis.from_url(private_redis.url)
    caplog.set_level(logging.WARNING, "observer_tasks")
    plans = [f"s{i}" for i in range(10)]
    assert [observe_late(p, "BTCUSDT") for p in plans] == ["enqueued"] * 10
    for plan in plans[:5]:
        r.hset(HEAT + plan, "heat_level", "hot")
    poll(lambda: r.xlen(STREAM) == 5, what="the five hits recorded")

    with SPELLS[reply](r):  # type: ignore[attr-defined]
        started = time.perf_counter()
        during = [observe("e1", "BTCUSDT"), observe_late("x1", "BTCUSDT"), observe_late("x2", "BTCUSDT")]
        cost = time.perf_counter() - started
    print(f"\n{reply}: calls during the spell returned {during} in {cost * 1000:.1f} ms")
    # Each says "not now" (a script, a failover, memory): the calls wait in the background thread and are made
    # once the spell ends. (Round-4 migration change 3: OOM was refused at once, "error", counted unavailable;
    # there is no Redis breaker any more.)
    assert during == ["deferred"] * 3 and cost < 0.3
    assert "Traceback" not in caplog.text

    poll(lambda: r.zcard(C.INFLIGHT) == 0 and r.exists(C.dedupe_key(EARLY, "e1")), timeout=30,
         what="every plan recorded")
    stream = r.xrange(STREAM)
    entries = [{k.decode(): v.decode() for k, v in f.items()} for _, f in stream]
    late = {e["plan_id"]: e for e in entries if e["obs_point"] == LATE_POINT}
    deferred = ["x1", "x2"]
    assert sorted(late) == plans + deferred
    assert len(late) == len([e for e in entries if e["obs_point"] == LATE_POINT])
    # Admitted only after their whole window (MAX_WAIT_MS 1000 < the 1.5 s spell): nobody could look in time.
    assert [(late[p]["heat_reason"], late[p]["recorded_by"]) for p in deferred] == [("redis_error", "admit")] * 2
    assert [e["plan_id"] for e in entries if e["obs_point"] == EARLY] == ["e1"]
    reasons = Counter(late[p]["heat_reason"] for p in plans[5:])
    print(f"{reply}: the five plans waiting through the spell ended as {dict(reasons)}")
    assert all(late[p]["heat_reason"] == "ok" for p in plans[:5])
    assert reasons == {"redis_error": 5}
    assert_counters_match_the_stream(r)
    out = worker.output()
    assert "raised unexpected" not in out and "Traceback" not in out
