"""The early observer: one look, one entry at create_apply_plan (real Redis)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pytest
import redis

from observer_tasks import observe
from observer_tasks.client import publisher

from .conftest import poll, stream_entries

HEAT = "quantum:harvest:heat:by_plan:"


def test_missing_then_duplicate(r: redis.Redis) -> None:
    assert observe("p1", "BTCUSDT", "EXECUTE") == "missing"
    assert observe("p1", "BTCUSDT", "EXECUTE") == "duplicate"
    (entry,) = stream_entries(r)
    assert (entry["obs_point"], entry["heat_found"], entry["heat_reason"], entry["apply_decision"]) == (
        "create_apply_plan", "0", "missing", "EXECUTE")


def test_found(r: redis.Redis) -> None:
    r.hset(HEAT + "p1", mapping={"heat_level": "warm", "heat_score": "0.7", "heat_action": "DOWNGRADE_FULL_TO_PARTIAL",
                                 "ts_epoch": "1700000000.0", "recommended_partial": "0.5", "out_action": "PARTIAL"})
    assert observe("p1", "BTCUSDT") == "ok"
    (entry,) = stream_entries(r)
    assert entry["heat_found"] == "1" and entry["heat_level"] == "warm" and entry["heat_recommended_partial"] == "0.5"
    assert entry["heat_out_action"] == "PARTIAL" and entry["apply_decision"] == ""


@pytest.mark.parametrize(("write", "expected"), [
    (lambda r: r.set(HEAT + "p1", "a string"), "parse_error"),  # WRONGTYPE: unreadable
    (lambda r: r.rpush(HEAT + "p1", "x"), "parse_error"),
    (lambda r: r.hset(HEAT + "p1", "heat_level", b"\xff\x00garbage"), "parse_error"),  # not UTF-8
    (lambda r: r.hset(HEAT + "p1", mapping={"heat_level": "hot", "debug_json": "x" * 100_000}), "ok"),  # capped
])
def test_unreadable_heat(r: redis.Redis, write: Callable[[redis.Redis], object], expected: str) -> None:
    write(r)
    assert observe("p1", "BTCUSDT") == expected
    (entry,) = stream_entries(r)
    assert entry["heat_reason"] == expected and entry["heat_found"] == ("1" if expected == "ok" else "0")
    assert len(entry["debug_json"]) <= 400
    assert sum(len(v) for v in entry.values()) < 1200


def test_prefix_is_configurable(r: redis.Redis, env: dict[str, str]) -> None:
    env["P28_HEAT_LOOKUP_PREFIX"] = "other:"
    r.hset("other:p1", "heat_level", "hot")
    assert observe("p1", "BTCUSDT") == "ok"


def test_disabled(r: redis.Redis, env: dict[str, str]) -> None:
    env["P28_HEAT_OBS_ENABLED"] = "false"
    assert observe("p1", "BTCUSDT") == "disabled"
    assert stream_entries(r) == []


@pytest.mark.parametrize("plan_id", ["", "   ", "x" * 10_000, "a*", "a:b", "a\nb", b"\xff\xfe", None, 7, ["p"]])
def test_bad_plan_ids_are_refused_and_counted(r: redis.Redis, plan_id: object,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "observer_tasks")
    assert observe(plan_id, "BTCUSDT") == "error"
    # Counted by the publisher thread, without waiting for another call.
    poll(lambda: r.hget("quantum:p28:counters", "refused|create_apply_plan|invalid_input") == b"1", 5,
         what="the refusal counted")
    assert observe("good", "BTCUSDT") == "missing"
    assert {k.decode() for k in r.keys("*")} == {
        "quantum:p28:counters", "quantum:stream:apply.heat.observed", "quantum:dedupe:p28:create_apply_plan:good"}
    assert "plan_id" in caplog.text


def test_bad_configuration_returns_error_without_raising(r: redis.Redis, env: dict[str, str],
                                                         caplog: pytest.LogCaptureFixture) -> None:
    env["P28_DEDUPE_TTL_SEC"] = "-1"
    caplog.set_level(logging.ERROR, "observer_tasks")
    assert observe("p1", "BTCUSDT") == "error"
    assert observe("p2", "BTCUSDT") == "error"
    assert caplog.text.count("P28_DEDUPE_TTL_SEC='-1'") == 1  # logged once


def test_fast_with_redis_unreachable(env: dict[str, str]) -> None:
    from observer_tasks.core.settings import CALL_TIMEOUT_S

    from .conftest import free_port

    env["REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    env["CELERY_BROKER_URL"] = env["REDIS_URL"]
    from observer_tasks import observe_late

    observe("warm-up", "BTCUSDT")  # first use builds the clients
    # Calls are deferred to the background thread (a hiccup costs no observation) until Redis has not answered
    # it for DEFER_PATIENCE_S; from then on they are refused. Either way each returns at once.
    results = []
    deadline = time.monotonic() + publisher.DEFER_PATIENCE_S + 5
    while "error" not in results[-2:] and time.monotonic() < deadline:
        for call in (observe, observe_late):
            start = time.perf_counter()
            results.append(call(f"p{len(results)}", "BTCUSDT"))
            assert time.perf_counter() - start < 0.05
        time.sleep(0.01)  # pacing the calls, not a synchronisation
    assert set(results) == {"deferred", "error"} and results[-2:] == ["error", "error"]
    for call in (observe, observe_late):
        for i in range(50):
            start = time.perf_counter()
            assert call(f"q{i}", "BTCUSDT") == "error"
            assert time.perf_counter() - start < CALL_TIMEOUT_S  # a refusal never costs the socket timeout


@pytest.mark.parametrize("call", ["observe", "observe_late"])
def test_redis_that_accepts_and_never_answers_costs_one_call_cap(env: dict[str, str], call: str,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """The real outage for the apply layer: the connection is accepted (the kernel completes the handshake)
    and no reply ever comes. The call waits its socket timeout (CALL_TIMEOUT_S) once, returns "error" with
    one line, and the breaker refuses the next calls at once."""
    import socket
    import threading

    import observer_tasks
    from observer_tasks.client import producer as producer_module
    from observer_tasks.core.settings import CALL_TIMEOUT_S

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        env["REDIS_URL"] = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        env["CELERY_BROKER_URL"] = env["REDIS_URL"]
        caplog.set_level(logging.WARNING, "observer_tasks")
        assert producer_module.producer() is not None  # built first: the call below is only the call
        function = getattr(observer_tasks, call)
        results: list[tuple[str, float]] = []

        def timed(plan: str) -> None:
            start = time.perf_counter()
            results.append((function(plan, "BTCUSDT"), time.perf_counter() - start))

        # In a thread, so that a call that waits for ever fails this test instead of hanging it.
        caller = threading.Thread(target=timed, args=("p1",), daemon=True)
        caller.start()
        caller.join(5)
        assert not caller.is_alive(), f"{call}() still waiting on a silent Redis after 5 s"
        (result, elapsed), = results
        print(f"\n{call}() against a silent Redis: {elapsed * 1000:.1f} ms (cap {CALL_TIMEOUT_S * 1000:.0f} ms)")
        # A silent server may be a stall: the call is handed to the background thread, not lost.
        assert result == "deferred"
        # It did wait for the answer (not a refusal), and once: redis-py's default three retries would be 4 caps.
        assert CALL_TIMEOUT_S <= elapsed < 3 * CALL_TIMEOUT_S
        timed("p2")  # joins the deferred calls without asking Redis
        assert results[1][0] == "deferred" and results[1][1] < CALL_TIMEOUT_S
        # Once the thread has had no answer for the patience, the breaker opens: refused without asking Redis.
        poll(lambda: function("p3", "BTCUSDT") == "error", publisher.DEFER_PATIENCE_S + 5, 0.05, "the breaker open")
        timed("p4")
        assert results[2][0] == "error" and results[2][1] < CALL_TIMEOUT_S
    assert caplog.text.count("Redis unavailable") == 1 and "Traceback" not in caplog.text
