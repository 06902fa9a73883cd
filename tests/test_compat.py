"""The drop-in for the replaced in-process heat_observer (issues 19, 27): its three call sites, as the apply layer
wrote them, each produce their entry through the observer (real Redis, a real worker), return None, never
raise, and say once where a passed value is not the observer's setting."""

from __future__ import annotations

import inspect
import logging
import os

import pytest
import redis

from observer_tasks.compat import heat_observer
from observer_tasks.core.settings import LATE_POINT, Settings

from .conftest import HEAT, STREAM, Worker, counters, lease, poll, stream_entries

PREFIX = HEAT


def test_the_signatures_are_the_replaced_modules() -> None:
    assert list(inspect.signature(heat_observer.observe).parameters) == [
        "redis_client", "plan_id", "symbol", "apply_decision", "obs_point", "enabled", "stream_name",
        "lookup_prefix", "dedupe_ttl_sec", "max_debug_chars"]
    assert list(inspect.signature(heat_observer.observe_late_async).parameters) == [
        "redis_client", "plan_id", "symbol", "lookup_prefix", "apply_decision", "obs_stream", "max_wait_ms",
        "poll_ms", "dedupe_ttl_sec", "max_debug_chars", "obs_point", "logger", "max_workers", "max_inflight"]
    assert list(inspect.signature(heat_observer.is_enabled).parameters) == ["env_value"]


@pytest.mark.parametrize(("value", "on"), [("true", True), (" TRUE ", True), ("1", True), ("yes", True),
                                           ("on", True), ("false", False), ("0", False), ("", False),
                                           (None, False), ("maybe", False), (1, True), (0, False)])
def test_is_enabled(value: object, on: bool) -> None:
    assert heat_observer.is_enabled(value) is on


def test_the_three_call_sites_each_produce_their_entry(worker: Worker, r: redis.Redis, env: dict[str, str],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """The replaced apply layer's call sites: observe at create_apply_plan, observe_late_async after
    publish_plan, and observe in its reconcile-close consumer (issue 27: its own point, its own decision; was
    two call sites, the third relabelled create_apply_plan / UNKNOWN). Heat written before the calls is recorded
    by the admission (round-4 migration change 1); heat written after them by the worker."""
    caplog.set_level(logging.WARNING, "observer_tasks")
    apply_redis = r  # the apply layer's own client, passed as it always was
    logger = logging.getLogger("apply")
    symbol, decision = "BTCUSDT", "EXECUTE"
    first, later = "P-compat-1", "P-compat-2"
    r.hset(PREFIX + first, mapping={"heat_level": "warm", "heat_action": "NONE"})

    for plan_id in (first, later):
        # create_apply_plan, as the apply layer calls it
        assert heat_observer.observe(
            redis_client=apply_redis, plan_id=plan_id, symbol=symbol, apply_decision=decision,
            obs_point="create_apply_plan",
            enabled=heat_observer.is_enabled(os.getenv("P28_HEAT_OBS_ENABLED", "true")), stream_name=STREAM,
            lookup_prefix=PREFIX, dedupe_ttl_sec=600, max_debug_chars=400) is None
        # after publish_plan, as the apply layer calls it (its own wait and poll: 2000/100; the observer's: 600/50)
        for _ in range(2):  # the disagreement is said once, not per call
            assert heat_observer.observe_late_async(
                redis_client=apply_redis, plan_id=plan_id, symbol=symbol, lookup_prefix=PREFIX,
                apply_decision=decision, obs_stream=STREAM, max_wait_ms=2000, poll_ms=100, dedupe_ttl_sec=600,
                max_debug_chars=400, obs_point="publish_plan_post", logger=logger, max_workers=4,
                max_inflight=200) is None
    # (A call deferred on a loaded machine is admitted by the outbox thread: heat comes after its admission.)
    poll(lambda: lease(r, later), 5, what="the later plan admitted")
    r.hset(PREFIX + later, mapping={"heat_level": "hot", "heat_action": "HOLD_CLOSE"})
    for plan_id in (first, later):
        # the reconcile-close consumer, as the apply layer calls it (decision from the plan)
        assert heat_observer.observe(
            redis_client=apply_redis, plan_id=plan_id, symbol=symbol, apply_decision="RECONCILE_CLOSE",
            obs_point="reconcile_close_consume",
            enabled=heat_observer.is_enabled(os.getenv("P28_HEAT_OBS_ENABLED", "true")), stream_name=STREAM,
            lookup_prefix=PREFIX, dedupe_ttl_sec=600, max_debug_chars=400) is None

    entries = poll(lambda: (e := stream_entries(r, STREAM)) and len(e) >= 6 and e, 15, what="six entries")
    assert sorted((e["obs_point"], e["plan_id"], e["heat_reason"], e["apply_decision"]) for e in entries) == [
        ("create_apply_plan", first, "ok", decision), ("create_apply_plan", later, "missing", decision),
        (LATE_POINT, first, "ok", decision), (LATE_POINT, later, "ok", decision),
        ("reconcile_close_consume", first, "ok", "RECONCILE_CLOSE"),
        ("reconcile_close_consume", later, "ok", "RECONCILE_CLOSE")]
    by = {e["plan_id"]: e["recorded_by"] for e in entries if e["obs_point"] == LATE_POINT}
    assert by[first] == "admit" and by[later] in ("wake", "look")
    said = [rec.getMessage() for rec in caplog.records if "heat_observer:" in rec.getMessage()]
    assert said == ["P2.8A observer: heat_observer: max_wait_ms=2000 passed, the observer uses "
                    "P28_LATE_OBS_MAX_WAIT_MS=600",
                    "P2.8A observer: heat_observer: poll_ms=100 passed, the observer uses P28_LATE_OBS_POLL_MS=50"]


def test_disabled_and_garbage_return_none_and_never_raise(r: redis.Redis, env: dict[str, str]) -> None:
    assert heat_observer.observe(redis_client=r, plan_id="p1", symbol="BTCUSDT", apply_decision="EXECUTE",
                                 obs_point="create_apply_plan", enabled=False, stream_name=STREAM,
                                 lookup_prefix=PREFIX, dedupe_ttl_sec=600, max_debug_chars=400) is None
    assert not r.exists(STREAM)  # disabled by the caller's switch: nothing observed
    assert heat_observer.observe(redis_client=object(), plan_id=None, symbol=b"\xff", apply_decision=object(),
                                 obs_point=object(), enabled=True, stream_name=3, lookup_prefix=None,
                                 dedupe_ttl_sec="x", max_debug_chars=[]) is None
    assert heat_observer.observe_late_async(redis_client=None, plan_id="bad:id", symbol=None, lookup_prefix=1,
                                            apply_decision=None, obs_stream=None, max_wait_ms="soon", poll_ms=None,
                                            dedupe_ttl_sec=None, max_debug_chars=None, obs_point=None, logger=None,
                                            max_workers=None, max_inflight=-1) is None
    # The bad input is counted as the observer counts it (a bad point under the first configured point).
    poll(lambda: counters(r)("p28_observe_refused", LATE_POINT, "invalid_input") == 1, 5, what="counted")
    first_point = Settings().early_points[0]
    poll(lambda: counters(r)("p28_observe_refused", first_point, "invalid_input") == 1, 5, what="counted")
    assert not r.exists(STREAM)
