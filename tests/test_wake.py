"""The wake path under faults (real Redis, real workers): killed connection, crashed listener thread, bursts of
unrelated writes, bad keys, two workers. Polls are the safety net: nothing may be lost or doubled."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import redis

from observer_tasks import observe_late
from observer_tasks.core.settings import Settings
from observer_tasks.core.store import Store, redis_client
from observer_tasks.worker.sweeper import Sweeper
from observer_tasks.worker.wake import WakeListener

from .conftest import DATA_URL, Worker, inflight, late_entries, poll

HEAT = "quantum:harvest:heat:by_plan:"
WAKE_DEGRADED = "quantum:p28:late_obs:wake_degraded"
SLOW_ENOUGH = {"P28_LATE_OBS_MAX_WAIT_MS": "3000", "P28_LATE_OBS_POLL_MS": "100",
               "P28_LATE_OBS_SAFETY_POLL_MS": "1000"}


def heartbeat(r: redis.Redis) -> dict[str, Any]:
    (raw,) = r.hvals("quantum:p28:workers")
    return dict(json.loads(raw))


def kill_wake_connections(r: redis.Redis) -> int:
    """CLIENT KILL every connection named observer_tasks:wake on this test's database; returns how many."""
    db = r.connection_pool.connection_kwargs["db"]
    ids = [line.split("id=")[1].split()[0] for line in r.execute_command("CLIENT", "LIST").decode().splitlines()
           if " name=observer_tasks:wake " in f" {line} " and f" db={db} " in f" {line} "]
    return sum(int(r.execute_command("CLIENT", "KILL", "ID", client_id)) for client_id in ids)


def wake_healthy(r: redis.Redis) -> bool:
    return bool(r.exists("quantum:p28:late_obs:wake_ok")) and not r.exists(WAKE_DEGRADED)


def assert_exactly_once(r: redis.Redis, plans: list[str]) -> list[dict[str, str]]:
    entries = late_entries(r)
    assert sorted(e["plan_id"] for e in entries) == sorted(plans)
    counts = {k.decode(): int(v) for k, v in r.hgetall("quantum:p28:counters").items()}
    assert sum(counts.get(f"recorded|{p}", 0) for p in ("look", "wake", "sweep")) == len(entries)
    assert inflight(r) == 0
    return entries


def test_killed_wake_connection_falls_back_and_resyncs(r: redis.Redis, env: dict[str, str],
                                                       start_worker: Callable[..., Worker]) -> None:
    env.update(SLOW_ENOUGH)
    start_worker()
    poll(lambda: wake_healthy(r), what="wake path healthy")
    plans = [f"k{i}" for i in range(20)]
    for plan in plans:
        assert observe_late(plan, "BTCUSDT") == "enqueued"
    for kill in range(2):
        assert kill_wake_connections(r) == 1
        killed = time.monotonic()
        # Heat written right after the kill: the resync (or the new connection) records it.
        for plan in plans[kill * 5:kill * 5 + 5]:
            r.hset(HEAT + plan, "heat_level", "hot")
        resynced = kill + 2  # one resync at start, one per kill
        poll(lambda: r.exists(WAKE_DEGRADED) or heartbeat(r)["resyncs"] >= resynced, timeout=1.0,  # noqa: B023
             what="the chain told to poll at POLL_MS within a second")
        poll(lambda: heartbeat(r)["resyncs"] >= resynced, timeout=5, what="reconnected and resynced")  # noqa: B023
        print(f"\nkill {kill + 1}: resynced {time.monotonic() - killed:.2f}s later")
    hits = plans[:10]
    poll(lambda: all(e["heat_reason"] == "ok" for e in late_entries(r) if e["plan_id"] in hits)
         and len([e for e in late_entries(r) if e["plan_id"] in hits]) == 10, timeout=5, what="hits recorded")
    poll(lambda: inflight(r) == 0, timeout=15, what="every plan recorded")
    entries = assert_exactly_once(r, plans)
    assert Counter(e["heat_reason"] for e in entries) == {"ok": 10, "timeout": 10}
    assert int(r.hget("quantum:p28:counters", "wake_resyncs") or 0) == 3  # start + two kills (flushes uncounted)


class CrashingStore(Store):
    """A real Store whose wake steps for p1 raise something the listener does not expect (a bug), as many
    times as the test's own budget says (shared by the listeners of one test, fresh for each test)."""

    def __init__(self, settings: Settings, client: redis.Redis, crashes: list[int]) -> None:
        super().__init__(settings, client)
        self.crashes = crashes

    def wake(self, plan_ids: list[str], client: Any = None) -> dict[str, str]:
        if "p1" in plan_ids and self.crashes[0]:
            self.crashes[0] -= 1
            raise RuntimeError("injected listener crash")
        return super().wake(plan_ids, client)


def test_crashed_listener_thread_is_replaced(r: redis.Redis, env: dict[str, str]) -> None:
    settings = Settings.from_env({**env, **SLOW_ENOUGH})
    store = Store(settings, redis_client(DATA_URL, 2.0, "test"))
    made: list[WakeListener] = []
    crashes = [1]

    def make_listener() -> WakeListener:
        made.append(WakeListener(CrashingStore(settings, redis_client(DATA_URL, 2.0, "test"), crashes), DATA_URL,
                                 2.0))
        return made[-1]

    sweeper = Sweeper(store, "crash@test", make_listener)
    sweeper.start()
    try:
        poll(lambda: wake_healthy(r), what="wake path healthy")
        store.admit("p1", "BTCUSDT", "")
        r.hset(HEAT + "p1", "heat_level", "hot")  # the push crashes the listener thread
        crashed_at = time.monotonic()
        poll(lambda: r.exists(WAKE_DEGRADED), timeout=1, what="the chain told to poll at POLL_MS within a second")
        poll(lambda: len(made) == 2, timeout=2, what="a new listener started")
        (entry,) = poll(lambda: late_entries(r), timeout=3, what="p1 recorded by the new listener's resync")
        assert (entry["heat_reason"], entry["recorded_by"]) == ("ok", "wake")
        assert crashes == [0]  # the first listener did crash
        print(f"\nrecorded {time.monotonic() - crashed_at:.2f}s after the crash")
    finally:
        sweeper.stopped.set()
        sweeper.join(5)


def test_burst_of_unrelated_writes_and_bad_keys(r: redis.Redis, env: dict[str, str],
                                                start_worker: Callable[..., Worker]) -> None:
    env.update(SLOW_ENOUGH)
    worker = start_worker()
    poll(lambda: wake_healthy(r), what="wake path healthy")

    def rss_kb() -> int:
        with open(f"/proc/{worker.proc.pid}/status") as f:
            status = f.read()
        return int(status.split("VmRSS:")[1].split()[0])

    before = rss_kb()
    plans = [f"b{i}" for i in range(10)]
    for plan in plans:
        assert observe_late(plan, "BTCUSDT") == "enqueued"
    pipe = r.pipeline(transaction=False)
    for i in range(10_000):
        pipe.hset(f"{HEAT}unrelated-{i}", "heat_level", "cold")
    for bad in ("a*b", "", "x:y", "é", "a" * 200):
        pipe.hset(HEAT + bad, "heat_level", "hot")
    r.publish("__redis__:invalidate", "not a tracking message")
    pipe.execute()
    written = time.monotonic()
    for plan in plans:
        r.hset(HEAT + plan, "heat_level", "warm")
    poll(lambda: len(late_entries(r)) == 10, timeout=1.0 + 1.0, what="plans recorded within one safety interval")
    print(f"\nafter 10 000 unrelated writes: 10 plans recorded {time.monotonic() - written:.2f}s later")
    entries = assert_exactly_once(r, plans)
    assert {e["heat_reason"] for e in entries} == {"ok"}
    assert worker.proc.poll() is None and "Traceback" not in worker.output()
    assert rss_kb() - before < 20_000  # flat: nothing kept per pushed key


def test_two_workers_record_every_plan_once(r: redis.Redis, env: dict[str, str],
                                            start_worker: Callable[..., Worker]) -> None:
    workers = 2
    for _ in range(workers):
        start_worker()
    poll(lambda: len(r.hvals("quantum:p28:workers")) == workers and wake_healthy(r), what="both listeners up")
    plans = [f"t{i}" for i in range(80)]
    for i, plan in enumerate(plans):
        assert observe_late(plan, "BTCUSDT") == "enqueued"
        if i % 2:
            r.hset(HEAT + plan, "heat_level", "hot")
    poll(lambda: inflight(r) == 0, timeout=30, what="every plan recorded")
    entries = assert_exactly_once(r, plans)
    assert Counter(e["heat_reason"] for e in entries) == {"ok": 40, "timeout": 40}
    assert {e["recorded_by"] for e in entries if e["heat_reason"] == "ok"} == {"wake"}
