"""The observer on Redis Sentinel (real servers: a master, a replica, three sentinels on loopback): data and
broker on redis+sentinel:// URLs, every role on the master Sentinel names, and `status` saying which."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from observer_tasks import observe_late
from observer_tasks.core.settings import Settings
from observer_tasks.core.store import master_address, redis_client
from observer_tasks.ops.cli import main

from .conftest import Worker, poll
from .sentinels import SentinelGroup

HEAT = "quantum:harvest:heat:by_plan:"


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    if not shutil.which("redis-server"):
        pytest.fail("redis-server is needed")  # installed in CI: never skipped
    g = SentinelGroup(tmp_path).start()
    yield g
    g.stop()


@pytest.fixture
def on_sentinel(group: SentinelGroup, env: dict[str, str]) -> redis.Redis:
    """The observer's data on db 0 and the broker on db 1 of the group's master, both by Sentinel URL."""
    env.update({"REDIS_URL": group.url(0), "CELERY_BROKER_URL": group.url(1)})
    return redis_client(group.url(0), 2.0, "test", Settings.from_env(env))


def entries(data: redis.Redis) -> list[dict[str, str]]:
    stream = data.xrange("quantum:stream:apply.heat.observed")
    return [{k.decode(): v.decode() for k, v in f.items()} for _id, f in stream
            if f[b"obs_point"] == b"publish_plan_post"]


def test_every_role_follows_the_master_sentinel_names(group: SentinelGroup, on_sentinel: redis.Redis,
                                                      env: dict[str, str], tmp_path: Path,
                                                      start_worker: Callable[..., Worker]) -> None:
    data = on_sentinel
    start_worker()
    poll(lambda: data.exists("quantum:p28:late_obs:wake_ok"), what="wake listener on the master")
    for i in range(6):
        assert observe_late(f"s{i}", "BTCUSDT") == "enqueued"
        if i % 2:
            data.hset(f"{HEAT}s{i}", "heat_level", "hot")
    poll(lambda: len(entries(data)) == 6, timeout=10, what="every plan recorded")
    assert sorted(e["heat_reason"] for e in entries(data)) == ["ok"] * 3 + ["timeout"] * 3
    master = f"127.0.0.1:{group.master_port()}"
    assert master_address(data.connection_pool) == master
    out = CliRunner().invoke(main, ["status"]).output
    assert f"answers, master {master}" in out, out
    roles_line = next(line for line in out.splitlines() if line.startswith("roles on:"))
    on_master, on_replica = roles_line.split(";")
    for role in ("broker", "look", "metrics", "producer", "wake ", "wake_step", "worker"):
        assert role in on_master, roles_line
    assert "(replica): none" in on_replica, roles_line
    # Each worker's heartbeat says where its connections and its listener's tracking are.
    (beat,) = (line for line in out.splitlines() if line.startswith("  test-"))
    assert beat.count(master) == 2, out
