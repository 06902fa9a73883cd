"""The wake path under faults (real Redis, real workers): killed connection, crashed listener thread, bursts of
unrelated writes, bad keys, two workers. Polls are the safety net: nothing may be lost or doubled."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from observer_tasks import observe_late
from observer_tasks.core import contract as C
from observer_tasks.core.connections import redis_client
from observer_tasks.core.ledger import Batch, Ledger
from observer_tasks.core.settings import Settings
from observer_tasks.core.timings import HEARTBEAT_S, WAKE_PING_S, WAKE_READ_S, WAKE_SILENT_S
from observer_tasks.worker.context import GapWatch
from observer_tasks.worker.heartbeat import Heartbeat
from observer_tasks.worker.services import WakeStep
from observer_tasks.worker.wake import WakeListener

from .conftest import (
    DATA_URL,
    HEAT,
    REDIS_HOST,
    REDIS_PORT,
    Worker,
    assert_exactly_once,
    counters,
    inflight,
    late_entries,
    poll,
    scrape,
)
from .proxy import Proxy

SLOW_ENOUGH = {"P28_LATE_OBS_MAX_WAIT_MS": "3000", "P28_LATE_OBS_POLL_MS": "100",
               "P28_LATE_OBS_SAFETY_POLL_MS": "1000"}


def heartbeat(r: redis.Redis) -> dict[str, Any]:
    (raw,) = r.hvals(C.WORKERS)
    return dict(json.loads(raw))


def kill_wake_connections(r: redis.Redis) -> int:
    """CLIENT KILL every connection named observer_tasks:wake on this test's database; returns how many."""
    db = r.connection_pool.connection_kwargs["db"]
    ids = [line.split("id=")[1].split()[0] for line in r.execute_command("CLIENT", "LIST").decode().splitlines()
           if " name=observer_tasks:wake " in f" {line} " and f" db={db} " in f" {line} "]
    return sum(int(r.execute_command("CLIENT", "KILL", "ID", client_id)) for client_id in ids)


def wake_healthy(r: redis.Redis) -> bool:
    """The wake path's health as the chains read it: one key, kept by the heartbeats (heartbeat.lua's rule)."""
    return bool(r.exists(C.WAKE))


def wake_degraded(r: redis.Redis) -> bool:
    return not r.exists(C.WAKE)


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
        poll(lambda: wake_degraded(r) or heartbeat(r)["resyncs"] >= resynced, timeout=1.0,  # noqa: B023
             what="the chain told to poll at POLL_MS within a second")
        poll(lambda: heartbeat(r)["resyncs"] >= resynced, timeout=5, what="reconnected and resynced")  # noqa: B023
        print(f"\nkill {kill + 1}: resynced {time.monotonic() - killed:.2f}s later")
    hits = plans[:10]
    poll(lambda: all(e["heat_reason"] == "ok" for e in late_entries(r) if e["plan_id"] in hits)
         and len([e for e in late_entries(r) if e["plan_id"] in hits]) == 10, timeout=5, what="hits recorded")
    poll(lambda: inflight(r) == 0, timeout=15, what="every plan recorded")
    entries = assert_exactly_once(r, plans)
    assert Counter(e["heat_reason"] for e in entries) == {"ok": 10, "timeout": 10}
    assert counters(r)("p28_late_obs_wake_resyncs") == 3  # start + two kills (flushes uncounted)


class CrashingLedger(Ledger):
    """A real Ledger whose wake steps for one plan raise something the listener does not expect (a bug), as
    many times as the test's own budget says (shared by the listeners of one test, fresh for each test)."""

    def __init__(self, settings: Settings, client: redis.Redis, plan: str, crashes: list[int]) -> None:
        super().__init__(settings, client)
        self.plan, self.crashes = plan, crashes

    def wake(self, plan_ids: Sequence[str]) -> Batch:
        if self.plan in plan_ids and self.crashes[0]:
            self.crashes[0] -= 1
            raise RuntimeError("injected listener crash")
        return super().wake(plan_ids)


def test_crashed_listener_thread_is_replaced(r: redis.Redis, env: dict[str, str]) -> None:
    """The wake step (services.WakeStep) and the heartbeat that supervises it, as the worker runs them: a
    listener thread that dies of a bug is reported (the chains poll at POLL_MS) and replaced, and the new one's
    resync records the plan."""
    settings = Settings.from_env({**env, **SLOW_ENOUGH})
    # Unique: the listener hears every database's heat writes (tracking spans the server), other suites' too.
    plan = f"crash-{uuid.uuid4().hex[:8]}"
    made: list[WakeListener] = []
    crashes = [1]

    class CrashingWakeStep(WakeStep):
        def new_listener(self) -> WakeListener:
            ledger = CrashingLedger(settings, redis_client(DATA_URL, 2.0, "wake_step"), plan, crashes)
            made.append(WakeListener(ledger, DATA_URL, 2.0))
            return made[-1]

    worker = SimpleNamespace(observer_context=SimpleNamespace(settings=settings))
    step = CrashingWakeStep(worker)
    step.start(worker)
    beat = Heartbeat(Ledger(settings, redis_client(DATA_URL, 2.0, "worker")), "crash@test", GapWatch(), step.state,
                     {})
    beat.start()
    try:
        poll(lambda: wake_healthy(r), what="wake path healthy")
        ledger = Ledger(settings, redis_client(DATA_URL, 2.0, "test"))
        assert ledger.admit(plan, "BTCUSDT", "").status == "admitted"
        r.hset(HEAT + plan, "heat_level", "hot")  # the push crashes the listener thread
        crashed_at = time.monotonic()
        poll(lambda: wake_degraded(r), timeout=1, what="the chain told to poll at POLL_MS within a second")
        poll(lambda: len(made) == 2, timeout=2, what="a new listener started")
        (entry,) = poll(lambda: late_entries(r), timeout=3, what="the plan recorded by the new listener's resync")
        assert (entry["plan_id"], entry["heat_reason"], entry["recorded_by"]) == (plan, "ok", "wake")
        assert crashes == [0] and not made[0].is_alive()  # the first listener did crash
        poll(lambda: wake_healthy(r), timeout=3, what="the wake path healthy again")
        print(f"\nrecorded {time.monotonic() - crashed_at:.2f}s after the crash")
    finally:
        beat.stopped.set()
        beat.join(5)
        step.stop(worker)


def test_burst_of_unrelated_writes_and_bad_keys(r: redis.Redis, env: dict[str, str],
                                                start_worker: Callable[..., Worker]) -> None:
    # The plans wait while the test writes the burst (50 000 HSETs: 2 s and more on the loaded shared cores);
    # their heat comes after it, so their window must outlast the burst whatever the load (every plan gets
    # heat: nothing waits for the deadline).
    env.update({**SLOW_ENOUGH, "P28_LATE_OBS_MAX_WAIT_MS": "15000"})
    worker = start_worker()
    poll(lambda: wake_healthy(r), what="wake path healthy")

    def rss_kb() -> int:
        with open(f"/proc/{worker.proc.pid}/status") as f:
            status = f.read()
        return int(status.split("VmRSS:")[1].split()[0])

    def burst_then_plans(tag: str, unrelated: int) -> int:
        """Writes to unrelated keys, then heat for 10 plans under observation; returns the bytes of key names
        pushed. The plans' pushes come after the burst's, so once they are recorded the burst was handled."""
        plans = [f"{tag}{i}" for i in range(10)]
        for plan in plans:
            assert observe_late(plan, "BTCUSDT") == "enqueued"
        pipe = r.pipeline(transaction=False)
        names = [f"{HEAT}unrelated-{tag}-{i}" for i in range(unrelated)]
        for name in names:
            pipe.hset(name, "heat_level", "cold")
        for bad in ("a*b", "", "x:y", "é", "a" * 200):
            pipe.hset(HEAT + bad, "heat_level", "hot")
        r.publish("__redis__:invalidate", "not a tracking message")
        pipe.execute()
        written = time.monotonic()
        for plan in plans:
            r.hset(HEAT + plan, "heat_level", "warm")
        poll(lambda: {e["plan_id"] for e in late_entries(r)} >= set(plans), timeout=1.0 + 1.0,
             what="plans recorded within one safety interval")
        print(f"\nafter {unrelated} unrelated writes: 10 plans recorded {time.monotonic() - written:.2f}s later")
        return sum(len(name) for name in names)

    burst_then_plans("b", 10_000)  # the first burst also grows the worker's buffers once
    settled = rss_kb()
    pushed = burst_then_plans("c", 50_000)
    grown_kb = rss_kb() - settled
    print(f"worker RSS after 50 000 more pushed keys: {grown_kb:+d} kB (their names alone: {pushed // 1024} kB)")
    entries = assert_exactly_once(r, [f"{tag}{i}" for tag in "bc" for i in range(10)])
    assert {e["heat_reason"] for e in entries} == {"ok"}
    assert worker.proc.poll() is None and "Traceback" not in worker.output()
    # Flat: a listener that kept anything per pushed key would keep at least its name.
    assert grown_kb * 1024 < pushed


def test_two_workers_record_every_plan_once(r: redis.Redis, env: dict[str, str],
                                            start_worker: Callable[..., Worker]) -> None:
    workers = 2
    for _ in range(workers):
        start_worker()
    poll(lambda: len(r.hvals(C.WORKERS)) == workers and wake_healthy(r), what="both listeners up")
    plans = [f"t{i}" for i in range(80)]
    for i, plan in enumerate(plans):
        assert observe_late(plan, "BTCUSDT") == "enqueued"
        if i % 2:
            r.hset(HEAT + plan, "heat_level", "hot")
    poll(lambda: inflight(r) == 0, timeout=30, what="every plan recorded")
    entries = assert_exactly_once(r, plans)
    assert Counter(e["heat_reason"] for e in entries) == {"ok": 40, "timeout": 40}
    assert {e["recorded_by"] for e in entries if e["heat_reason"] == "ok"} == {"wake"}


@pytest.mark.slow
def test_silently_dropped_wake_connection_is_replaced(r: redis.Redis, env: dict[str, str],
                                                      start_worker: Callable[..., Worker]) -> None:
    """A proxy stops forwarding the wake connection's traffic without closing it (a firewall that forgot the
    flow): the listener notices by its PING, the chains poll at POLL_MS while it is lost, and once traffic
    flows again a new connection resyncs."""
    proxy = Proxy((REDIS_HOST, REDIS_PORT))
    proxy.start()
    try:
        env.update({"P28_LATE_OBS_MAX_WAIT_MS": "2000", "P28_LATE_OBS_POLL_MS": "100",
                    "P28_LATE_OBS_SAFETY_POLL_MS": "1000",
                    "REDIS_URL": f"redis://127.0.0.1:{proxy.port}/{DATA_URL.rsplit('/', 1)[1]}"})
        worker = start_worker()
        poll(lambda: wake_healthy(r), what="wake path healthy")
        # Healthy: a plan without heat is looked at every safety interval, about MAX_WAIT/SAFETY times.
        assert observe_late("calm", "BTCUSDT") == "enqueued"
        (calm,) = poll(lambda: late_entries(r), timeout=10, what="the calm plan recorded")
        assert int(calm["polls"]) <= 4, calm
        resyncs = heartbeat(r)["resyncs"]

        proxy.silenced.add("wake")
        cut = time.monotonic()
        noticed_within = WAKE_PING_S + WAKE_SILENT_S + WAKE_READ_S + 2 * HEARTBEAT_S + 1.0
        poll(lambda: wake_degraded(r), timeout=noticed_within, what="the silent connection noticed")
        noticed = time.monotonic() - cut
        assert heartbeat(r)["wake"] == "reconnecting"
        # What the wake-degraded alert reads (listeners up < workers).
        page = poll(lambda: scrape(worker.metrics_port), what="/metrics")
        assert "p28_late_obs_wake_listeners_up 0.0" in page and "p28_late_obs_wake_workers 1.0" in page
        # Lost: the chains poll at POLL_MS, and heat written now is recorded by a look within a few polls.
        assert observe_late("cut", "BTCUSDT") == "enqueued"
        assert observe_late("cut-hit", "BTCUSDT") == "enqueued"
        r.hset(HEAT + "cut-hit", "heat_level", "hot")
        poll(lambda: len(late_entries(r)) == 3, timeout=10, what="the plans of the cut recorded")
        during = {e["plan_id"]: e for e in late_entries(r)}
        assert int(during["cut"]["polls"]) >= 8, during["cut"]
        assert (during["cut-hit"]["heat_reason"], during["cut-hit"]["recorded_by"]) == ("ok", "look")
        assert heartbeat(r)["resyncs"] == resyncs  # still cut off: no new connection got through

        proxy.silenced.discard("wake")
        restored = time.monotonic()
        poll(lambda: heartbeat(r)["resyncs"] > resyncs and wake_healthy(r), timeout=10,
             what="a new wake connection, resynced")
        back = time.monotonic() - restored
        assert proxy.opened["wake"] >= 2
        print(f"\nsilent wake connection: noticed (chains on POLL_MS) {noticed:.1f}s after the cut; "
              f"replaced and resynced {back:.1f}s after traffic flowed again; cut plan polls {during['cut']['polls']}, "
              f"calm plan polls {calm['polls']}")
        entries = assert_exactly_once(r, ["calm", "cut", "cut-hit"])
        assert Counter(e["heat_reason"] for e in entries) == {"ok": 1, "timeout": 2}
    finally:
        proxy.stop()
