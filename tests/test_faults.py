"""Faults injected for real: paused and restarted Redis, killed workers, dead brokers."""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from observer_tasks import observe, observe_late
from observer_tasks.core.settings import LATE_POINT, Settings
from observer_tasks.core.timings import PUBLISH_TIMEOUT_S

from .conftest import (
    HEAT,
    STREAM,
    PrivateRedis,
    Worker,
    assert_exactly_once,
    counters,
    free_port,
    inflight,
    late_entries,
    notes,
    poll,
)
from .timing import hold


def test_lookups_that_fail_twice_end_as_redis_error(env: dict[str, str], amqp_broker: str,
                                                   private_redis: PrivateRedis, start_worker) -> None:  # type: ignore[no-untyped-def]
    """The heat store stops answering (a paused process): lookups time out, the plan ends as redis_error."""
    env["REDIS_URL"] = private_redis.url
    env["P28_LATE_OBS_MAX_WAIT_MS"] = "3000"
    # Polling only, so the plan's looks start at once (with the wake path healthy the first look waits one
    # safety interval, and a pause from the call on would fail only that one).
    env["P28_LATE_OBS_WAKE"] = "false"
    worker = start_worker()
    r = redis.Redis.from_url(private_redis.url)
    assert observe_late("p1", "BTCUSDT") == "enqueued"
    assert private_redis.proc is not None
    private_redis.proc.send_signal(signal.SIGSTOP)
    paused_at = time.monotonic()
    # The pause is the fault under test: 1.5 s outlasts two lookup timeouts (0.5 s each), so the plan's looks
    # fail twice; the entry can only be written once the server runs again.
    resume = threading.Timer(1.5, private_redis.proc.send_signal, (signal.SIGCONT,))
    resume.start()
    entry = poll(lambda: r.xrange(STREAM), timeout=20, what="the entry")
    resume.join()
    assert len(entry) == 1
    fields = {k.decode(): v.decode() for k, v in entry[0][1].items()}
    assert fields["heat_reason"] == "redis_error" and fields["heat_found"] == "0"
    # Ended by the plan's own task once Redis answered again, not left to the sweeper (deadline + grace).
    assert fields["recorded_by"] == "look"
    print(f"\nredis_error recorded {time.monotonic() - paused_at:.1f}s after the pause began")
    # The worker is not wedged: the next plan is observed normally (its heat written while it waits, so the
    # worker records it; heat written before the call would be recorded by the admission itself).
    assert observe_late("p2", "BTCUSDT") == "enqueued"
    r.hset(HEAT + "p2", "heat_level", "hot")
    poll(lambda: r.xlen(STREAM) == 2, timeout=20, what="the next plan")
    assert late_entries(r)[-1]["recorded_by"] in ("wake", "look")
    assert worker.proc.poll() is None


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A TCP port that accepts connections (the kernel completes the handshake) but never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(2048)
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


@pytest.mark.parametrize("broker", ["refused", "blackhole-redis", "blackhole-amqp"])
def test_broker_unreachable_at_enqueue(r: redis.Redis, env: dict[str, str], blackhole: str, broker: str,
                                       caplog: pytest.LogCaptureFixture) -> None:
    """Calls never wait on the broker (the publisher thread does); once it has failed, the breaker refuses
    plans at once (counted, logged once); plans admitted before that keep their lease for the sweeper."""
    env["CELERY_BROKER_URL"] = {
        "refused": f"redis://127.0.0.1:{free_port()}/0",
        "blackhole-redis": f"redis://{blackhole}/0",
        "blackhole-amqp": f"amqp://guest:guest@{blackhole}//",
    }[broker]
    caplog.set_level(logging.WARNING, "observer_tasks")
    observe("warm-up", "BTCUSDT")  # builds the process's clients
    costs, results = [], []
    for i in range(1000):
        start = time.perf_counter()
        results.append(observe_late(f"p{i}", "BTCUSDT"))
        costs.append(time.perf_counter() - start)
    print(f"\nbroker {broker}: first call {costs[0] * 1000:.1f} ms, max {max(costs) * 1000:.1f} ms, "
          f"1000 calls {sum(costs) * 1000:.1f} ms, p99 {sorted(costs)[989] * 1e6:.0f} us, "
          f"{results.count('enqueued')} admitted before the breaker opened")
    # No call waited on the broker: one that did would take at least the publisher's socket timeout. How fast
    # the calls are is the benchmark's figure (docs/performance.md), not a window for a shared machine.
    assert max(costs) < PUBLISH_TIMEOUT_S
    admitted, refused = results.count("enqueued"), results.count("error")
    # Until the publisher has retried the broker for DEFER_PATIENCE_S, plans are admitted, up to MAX_INFLIGHT.
    assert admitted >= 1 and admitted + refused + results.count("dropped") == 1000
    # Admitted plans keep their lease, with the cause the sweeper will copy into debug_json.
    poll(lambda: len(notes(r)) == admitted, what="unsent causes noted")
    assert inflight(r) == admitted
    assert caplog.text.count("broker unavailable") >= 1
    assert "Traceback" not in caplog.text
    poll(lambda: counters(r)("p28_observe_refused", LATE_POINT, "unavailable") == refused, what="refusals counted")
    # The early observer still works (Redis is up).
    assert observe("after", "BTCUSDT") == "missing"


def test_pickled_messages_are_refused(r: redis.Redis, env: dict[str, str], worker: Worker) -> None:
    from kombu import Connection, Exchange

    now = int(time.time() * 1000)
    body = (("p1", "BTCUSDT", "", now, now + 500), {}, {})
    with Connection(env["CELERY_BROKER_URL"]) as conn:
        conn.Producer().publish(
            body, serializer="pickle", exchange=Exchange("late_obs", type="direct"), routing_key="late_obs",
            headers={"task": "observer_tasks.late_observe", "id": "pickled-1", "lang": "py", "argsrepr": "",
                     "kwargsrepr": ""},
        )
    poll(lambda: "untrusted content" in worker.output(), what="the refusal logged")
    assert observe_late("p2", "BTCUSDT") == "enqueued"
    r.hset(HEAT + "p2", "heat_level", "hot")  # while it waits: the worker records it (not the admission)
    poll(lambda: late_entries(r), what="the next plan observed")
    assert late_entries(r)[0]["recorded_by"] in ("wake", "look")
    assert [e["plan_id"] for e in late_entries(r)] == ["p2"]


def load(r: redis.Redis, plans: list[str], heat_every: int = 3) -> list[str]:
    """Publish plans (heat for every heat_every-th one later); return those admitted."""
    admitted = []
    for i, plan in enumerate(plans):
        if observe_late(plan, "BTCUSDT", "EXECUTE") == "enqueued":
            admitted.append(plan)
        if i % heat_every == 0:
            r.hset(HEAT + plan, "heat_level", "warm")
    return admitted


@pytest.mark.slow
def test_worker_killed_mid_load(r: redis.Redis, env: dict[str, str], start_worker) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL with hundreds in flight; a new worker (and its sweeper) records every plan exactly once."""
    env.update({"P28_LATE_OBS_MAX_WAIT_MS": "2000", "P28_LATE_OBS_POLL_MS": "100", "P28_LATE_OBS_MAX_INFLIGHT": "500"})
    first = start_worker()
    admitted = load(r, [f"k{i}" for i in range(300)], heat_every=50)
    poll(lambda: len(late_entries(r)) >= 3, what="some plans recorded before the kill")
    first.stop(signal.SIGKILL)
    killed_at = time.monotonic()
    assert inflight(r) > 100  # hundreds were in flight (executing, waiting on a countdown or queued)
    start_worker()
    poll(lambda: inflight(r) == 0, timeout=90, interval=0.2, what="every lease recorded")
    recovery_s = time.monotonic() - killed_at
    print(f"\nrecovery after SIGKILL: {recovery_s:.1f}s for {len(admitted)} plans")
    # The new worker's sweeper records the dead worker's leases at deadline + grace, before the broker's
    # visibility timeout even hands its messages back: without the sweeper it takes at least that long.
    assert recovery_s < Settings.from_env(env).visibility_timeout_s
    # Messages the dead worker held come back after the visibility timeout and must add nothing.
    broker = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    poll(lambda: broker.hlen("unacked") == 0 and broker.llen("late_obs") == 0, timeout=90, interval=0.5,
         what="the dead worker's unacked messages restored and run")
    assert_exactly_once(r, admitted)  # whoever recorded each plan: a redelivered message or the sweeper


@pytest.mark.slow
def test_worker_stopped_gracefully_mid_load(r: redis.Redis, env: dict[str, str], start_worker) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM: the worker hands its messages back at once; nothing waits for a visibility timeout or a sweep."""
    # The plans' leases end MAX_WAIT + the sweeper's grace (now 1 s) after admission: 11 s, as with the former
    # 5 s grace, so a new worker slow to start on the loaded shared cores still finds them to look at itself.
    env.update({"P28_LATE_OBS_MAX_WAIT_MS": "10000", "P28_LATE_OBS_POLL_MS": "100", "P28_LATE_OBS_MAX_INFLIGHT": "500"})
    first = start_worker()
    admitted = load(r, [f"t{i}" for i in range(200)], heat_every=4)
    poll(lambda: len(late_entries(r)) >= 3, what="some plans recorded before the stop")
    assert first.stop(signal.SIGTERM) == 0
    stopped_at = time.monotonic()
    start_worker()
    poll(lambda: inflight(r) == 0, timeout=60, interval=0.2, what="every lease recorded")
    print(f"\nrecovery after SIGTERM: {time.monotonic() - stopped_at:.1f}s for {len(admitted)} plans")
    # No message waited for the visibility timeout (the sweeper's part is checked below: recovered stays 0).
    assert time.monotonic() - stopped_at < Settings.from_env(env).visibility_timeout_s
    assert_exactly_once(r, admitted)
    assert counters(r)("p28_late_obs_recovered") == 0  # the sweeper had nothing to do


@pytest.mark.slow
def test_redis_restarted_mid_load(env: dict[str, str], private_redis: PrivateRedis, start_worker) -> None:  # type: ignore[no-untyped-def]
    """Redis (data store and broker) restarts with plans in flight: no silent loss, the worker reconnects."""
    env.update({"REDIS_URL": private_redis.url, "CELERY_BROKER_URL": private_redis.url,
                "P28_LATE_OBS_MAX_WAIT_MS": "3000", "P28_LATE_OBS_POLL_MS": "100"})
    worker = start_worker()
    assert "observer_tasks.worker.kombu_guard:Transport" in worker.output()
    r = redis.Redis.from_url(private_redis.url)
    admitted = load(r, [f"r{i}" for i in range(100)], heat_every=5)
    poll(lambda: late_entries(r), what="some plans recorded before the restart")
    private_redis.stop()
    poll(lambda: "Connection to broker lost" in worker.output(), timeout=10, what="the worker sees the outage")
    # The outage's length is the fault under test: 1.5 s is 15 POLL_MS, so the plans looking meanwhile fail
    # their looks twice and end as redis_error (asserted below).
    hold(1.5, "the outage's length is the fault under test")
    private_redis.start()
    restarted_at = time.monotonic()
    poll(lambda: inflight(r) == 0, timeout=60, interval=0.2, what="every lease recorded after the restart")
    print(f"\nall leases recorded {time.monotonic() - restarted_at:.1f}s after the Redis restart")
    broker_idle = lambda: r.hlen("unacked") == 0 and r.llen("late_obs") == 0  # noqa: E731
    poll(broker_idle, timeout=90, interval=0.5, what="redelivered messages run")
    assert_exactly_once(r, admitted)
    reasons = {e["heat_reason"] for e in late_entries(r)}
    assert "redis_error" in reasons and reasons <= {"ok", "timeout", "redis_error"}
    # The same worker process goes on observing new plans (heat written while the plan waits: the worker's).
    assert observe_late("after", "BTCUSDT") == "enqueued"
    r.hset(HEAT + "after", "heat_level", "hot")
    poll(lambda: any(e["plan_id"] == "after" and e["heat_reason"] == "ok" for e in late_entries(r)), timeout=30,
         what="a new plan observed after the restart")
    assert worker.proc.poll() is None


@pytest.mark.parametrize("transport", ["kombu", "guard"])
def test_kombu_close_path_after_a_lost_connection(private_redis: PrivateRedis, transport: str) -> None:
    """The kombu 5.7 bug the guard exists for, reproduced where it happens: a channel holding a delivered,
    unacknowledged message is closed after its connection has dropped the transport's client (the state
    Celery's cleanup after a broker loss leaves: ``Connection.collect``/``close`` end in
    ``_do_close_transport``). Closing requeues the message through ``Channel._connparams``: kombu's own
    transport fails with an AttributeError, which Celery treats as fatal (the worker exits); the guard's
    raises a connection error, which Celery answers by reconnecting. When kombu fixes it, the first case
    fails and the guard can go."""
    from kombu import Connection, Consumer, Producer, Queue

    from observer_tasks.worker.kombu_guard import TRANSPORT

    conn = Connection(private_redis.url, transport=TRANSPORT if transport == "guard" else None)
    queue = Queue("q")
    Producer(conn.channel()).publish({"n": 1}, routing_key="q", declare=[queue])
    channel = conn.channel()
    delivered: list[object] = []
    Consumer(channel, [queue], callbacks=[lambda body, message: delivered.append(message)]).consume()
    conn.drain_events(timeout=5)
    assert len(delivered) == 1 and channel.qos._delivered  # held, not acknowledged
    connection_errors = conn.connection_errors
    conn._do_close_transport()
    with pytest.raises(Exception) as raised:
        channel.close()
    if transport == "kombu":
        assert isinstance(raised.value, AttributeError) and "'hostname'" in str(raised.value)
    else:
        assert isinstance(raised.value, connection_errors), repr(raised.value)
