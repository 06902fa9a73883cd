"""The early observer: one look, one entry at each configured observation point (real Redis)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pytest
import redis

from observer_tasks import observe
from observer_tasks.client import outbox
from observer_tasks.client import producer as producer_module
from observer_tasks.core import contract as C
from observer_tasks.core.settings import LATE_POINT, Settings
from observer_tasks.core.timings import CALL_TIMEOUT_S, RIDE_OUT_S

from .conftest import HEAT, STREAM, counters, poll, stream_entries
from .timing import hold

EARLY, RECONCILE = Settings().early_points


def test_missing_then_duplicate(r: redis.Redis) -> None:
    assert observe("p1", "BTCUSDT", "EXECUTE") == "missing"
    assert observe("p1", "BTCUSDT", "EXECUTE") == "duplicate"
    (entry,) = stream_entries(r)
    assert (entry["obs_point"], entry["heat_found"], entry["heat_reason"], entry["apply_decision"]) == (
        EARLY, "0", "missing", "EXECUTE")


def test_each_configured_point_is_observed_and_deduplicated_on_its_own(r: redis.Redis) -> None:
    """Round-4 migration change 6: observe(..., obs_point=...) at any point of P28_HEAT_OBS_POINTS, each with
    its own dedupe key and its own decision; the default point is the first configured."""
    r.hset(HEAT + "p1", "heat_level", "hot")
    assert observe("p1", "BTCUSDT", "EXECUTE") == "ok"
    assert observe("p1", "BTCUSDT", "RECONCILE_CLOSE", obs_point=RECONCILE) == "ok"
    assert observe("p1", "BTCUSDT", "EXECUTE", obs_point=EARLY) == "duplicate"
    assert observe("p1", "BTCUSDT", "RECONCILE_CLOSE", obs_point=RECONCILE) == "duplicate"
    assert sorted((e["obs_point"], e["apply_decision"], e["heat_reason"]) for e in stream_entries(r)) == [
        (EARLY, "EXECUTE", "ok"), (RECONCILE, "RECONCILE_CLOSE", "ok")]
    assert r.exists(C.dedupe_key(EARLY, "p1"), C.dedupe_key(RECONCILE, "p1")) == 2
    assert (counters(r)("p28_heat_reason", EARLY, "ok"), counters(r)("p28_heat_reason", RECONCILE, "ok")) == (1, 1)


@pytest.mark.parametrize("point", [LATE_POINT, "other_point", "", None, 3])
def test_a_point_outside_the_configured_set_is_refused_and_counted(r: redis.Redis, point: object,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Round-4 migration change 6: "error", counted invalid_input under the first configured point (a label
    outside the set would be a new series), never relabelled; None is the default point."""
    caplog.set_level(logging.WARNING, "observer_tasks")
    if point is None:
        assert observe("p1", "BTCUSDT", obs_point=point) == "missing"
        assert [e["obs_point"] for e in stream_entries(r)] == [EARLY]
        return
    assert observe("p1", "BTCUSDT", obs_point=point) == "error"
    poll(lambda: counters(r)("p28_observe_refused", EARLY, "invalid_input") == 1, 5, what="the refusal counted")
    assert stream_entries(r) == [] and "P28_HEAT_OBS_POINTS" in caplog.text


@pytest.mark.parametrize("decision", ["EXECUTE", "SKIP", "BLOCKED", "ERROR", "RECONCILE_CLOSE", "", "skip", "Hold.1"])
def test_decisions_are_recorded_as_passed(r: redis.Redis, decision: str) -> None:
    """Round-4 migration change 5 (was: upper-cased, ERROR/RECONCILE_CLOSE/other values recorded UNKNOWN)."""
    assert observe("p1", "BTCUSDT", decision) == "missing"
    assert [e["apply_decision"] for e in stream_entries(r)] == [decision]


@pytest.mark.parametrize("decision", ["x" * 33, "a b", "a:b", "é", 7])
def test_a_bad_decision_is_refused_and_counted(r: redis.Redis, decision: object) -> None:
    """Round-4 migration change 5: not 0-32 characters of A-Z a-z 0-9 _ . -: "error", counted invalid_input."""
    assert observe("p1", "BTCUSDT", decision) == "error"
    poll(lambda: counters(r)("p28_observe_refused", EARLY, "invalid_input") == 1, 5, what="the refusal counted")
    assert stream_entries(r) == []


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
    # Counted by the outbox thread, without waiting for another call.
    poll(lambda: counters(r)("p28_observe_refused", EARLY, "invalid_input") == 1, 5, what="the refusal counted")
    assert observe("good", "BTCUSDT") == "missing"
    # (C.PRODUCERS: the apply process's limits for `status`, written by its outbox thread whatever the calls.)
    assert {k.decode() for k in r.keys("*")} - {C.PRODUCERS} == {C.COUNTERS, STREAM, C.dedupe_key(EARLY, "good")}
    assert "plan_id" in caplog.text


def test_bad_configuration_returns_error_without_raising(r: redis.Redis, env: dict[str, str],
                                                         caplog: pytest.LogCaptureFixture) -> None:
    env["P28_DEDUPE_TTL_SEC"] = "-1"
    caplog.set_level(logging.ERROR, "observer_tasks")
    assert observe("p1", "BTCUSDT") == "error"
    assert observe("p2", "BTCUSDT") == "error"
    assert caplog.text.count("P28_DEDUPE_TTL_SEC='-1'") == 1  # logged once


def test_fast_with_redis_unreachable(env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                                     caplog: pytest.LogCaptureFixture) -> None:
    """Round-4 migration change 3: calls are held ("deferred") in the outbox however long Redis stays away (no
    2 s give-up, no breaker refusing them), each returning at once; only calls beyond OUTBOX_MAX are given up
    ("error"), and what is still held at exit is given up too (not countable here: Redis never answers)."""
    from .conftest import free_port

    env["REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    env["CELERY_BROKER_URL"] = env["REDIS_URL"]
    from observer_tasks import observe_late

    monkeypatch.setattr(outbox, "OUTBOX_MAX", 400)  # the bound, small enough to reach in this test
    caplog.set_level(logging.WARNING, "observer_tasks")
    observe("warm-up", "BTCUSDT")  # first use builds the clients
    results = []
    deadline = time.monotonic() + RIDE_OUT_S + 1  # past the former 2 s give-up
    while time.monotonic() < deadline:
        for call in (observe, observe_late):
            start = time.perf_counter()
            results.append(call(f"p{len(results)}", "BTCUSDT"))
            assert time.perf_counter() - start < CALL_TIMEOUT_S
        hold(0.02, "pacing the calls, not a synchronisation")
    assert set(results) == {"deferred"} and len(results) < 399
    held = 1 + len(results)
    for i in range(400 - held):  # up to the bound: held
        assert observe_late(f"q{i}", "BTCUSDT") == "deferred"
    for call in (observe, observe_late):  # beyond it: given up at once
        for i in range(50):
            start = time.perf_counter()
            assert call(f"over{i}", "BTCUSDT") == "error"
            assert time.perf_counter() - start < CALL_TIMEOUT_S  # a refusal never costs the socket timeout
    p = producer_module.producer()
    assert p is not None and len(p.outbox.calls) == 400
    assert p.outbox.counts[C.refused_field(EARLY, "given_up")] == 50
    assert p.outbox.counts[C.refused_field(LATE_POINT, "given_up")] == 50
    start = time.monotonic()
    producer_module.reset()  # what the interpreter's exit does (the flush at exit)
    assert time.monotonic() - start < 5  # the exit flush is bounded (its pay() may wait one 1 s socket timeout)
    assert len(p.outbox.calls) == 0 and "400 call(s) held through a Redis outage given up at exit" in caplog.text
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("call", ["observe", "observe_late"])
def test_redis_that_accepts_and_never_answers_costs_one_call_cap(env: dict[str, str], call: str,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """The real outage for the apply layer: the connection is accepted (the kernel completes the handshake)
    and no reply ever comes. The call waits its socket timeout (CALL_TIMEOUT_S) once and is handed to the
    outbox ("deferred") with one line; the next calls join it at once, however long the outage lasts (round-4
    migration change 3: no breaker refusing them after 2 s any more)."""
    import socket
    import threading

    import observer_tasks

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
        timed("p2")  # joins the held calls without asking Redis
        assert results[1][0] == "deferred" and results[1][1] < CALL_TIMEOUT_S
        # Past the former 2 s give-up, calls are still held, still without asking Redis.
        outbox_of = producer_module.producer().outbox  # type: ignore[union-attr]
        poll(lambda: outbox_of.failing_since is not None, 5, 0.05, "the outbox thread meeting the silent Redis")
        ride_out_end = time.monotonic() + RIDE_OUT_S + 0.5
        n = 3
        while time.monotonic() < ride_out_end:
            timed(f"p{n}")
            n += 1
            hold(0.05, "pacing, not a synchronisation")
        assert {res for res, _ in results} == {"deferred"} and max(cost for _, cost in results[1:]) < CALL_TIMEOUT_S
        assert len(outbox_of.calls) == len(results)
    lines = [rec.getMessage() for rec in caplog.records]
    assert len([m for m in lines if "unavailable" in m]) == 1, lines  # throttled: one line for the outage
    assert "Traceback" not in caplog.text
