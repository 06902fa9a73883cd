"""Call for call: the replaced apply layer's three call sites, made as it makes them, with only the import changed.

quantum_trader's microservices/apply_layer/main.py observes each plan at three points: ``observe`` at
create_apply_plan (``apply_decision=decision.value``), ``observe_late_async`` after publish_plan
(``apply_decision=plan.decision``) and ``observe`` in its reconcile-close consumer (``apply_decision`` from the
consumed plan's fields, ``obs_point="reconcile_close_consume"``), each with the same keyword arguments and the
kinds of values it passes (its settings read from the environment, its own Redis client, its logger). The
``ApplyLayer`` below is a stand-in written for this test: it holds those three calls and nothing of the rest.
For every plan the observer must record one entry per observation point, with the decision as passed and the
heat as HeatBridge wrote it, and counters equal to the stream, on both brokers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from enum import Enum
from typing import Any

import pytest
import redis

from observer_tasks.compat import heat_observer  # the one changed line: was `import heat_observer`

from .conftest import HEAT, STREAM, Worker, assert_counters_match_the_stream, poll, stream_entries

logger = logging.getLogger("apply_layer")


class Decision(Enum):
    """The replaced apply layer's decisions."""

    EXECUTE = "EXECUTE"
    SKIP = "SKIP"
    BLOCKED = "BLOCKED"
    ERROR = "ERROR"
    RECONCILE_CLOSE = "RECONCILE_CLOSE"


class ApplyLayer:
    """The three observation calls of the replaced apply layer, with its settings as it reads them."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self.p28_enabled = heat_observer and heat_observer.is_enabled(os.getenv("P28_HEAT_OBS_ENABLED", "true"))
        self.p28_stream = os.getenv("P28_HEAT_OBS_STREAM", "quantum:stream:apply.heat.observed")
        self.p28_lookup_prefix = os.getenv("P28_HEAT_LOOKUP_PREFIX", "quantum:harvest:heat:by_plan:")
        self.p28_dedupe_ttl = int(os.getenv("P28_DEDUPE_TTL_SEC", "600"))
        self.p28_max_debug = int(os.getenv("P28_MAX_DEBUG_CHARS", "400"))
        self.p28_late_enabled = heat_observer and heat_observer.is_enabled(os.getenv("P28_LATE_OBS_ENABLED", "true"))
        self.p28_late_max_wait_ms = int(os.getenv("P28_LATE_OBS_MAX_WAIT_MS", "2000"))
        self.p28_late_poll_ms = int(os.getenv("P28_LATE_OBS_POLL_MS", "100"))
        self.p28_late_max_workers = int(os.getenv("P28_LATE_OBS_MAX_WORKERS", "4"))
        self.p28_late_max_inflight = int(os.getenv("P28_LATE_OBS_MAX_INFLIGHT", "200"))

    def create_apply_plan(self, plan_id: str, symbol: str, decision: Decision) -> None:
        if self.p28_enabled and heat_observer:
            heat_observer.observe(
                redis_client=self.redis, plan_id=plan_id, symbol=symbol, apply_decision=decision.value,
                obs_point="create_apply_plan", enabled=self.p28_enabled, stream_name=self.p28_stream,
                lookup_prefix=self.p28_lookup_prefix, dedupe_ttl_sec=self.p28_dedupe_ttl,
                max_debug_chars=self.p28_max_debug)

    def publish_plan(self, plan_id: str, symbol: str, decision: str) -> None:
        if self.p28_late_enabled and heat_observer:
            heat_observer.observe_late_async(
                redis_client=self.redis, plan_id=plan_id, symbol=symbol, lookup_prefix=self.p28_lookup_prefix,
                apply_decision=decision, obs_stream=self.p28_stream, max_wait_ms=self.p28_late_max_wait_ms,
                poll_ms=self.p28_late_poll_ms, dedupe_ttl_sec=self.p28_dedupe_ttl, max_debug_chars=self.p28_max_debug,
                obs_point="publish_plan_post", logger=logger, max_workers=self.p28_late_max_workers,
                max_inflight=self.p28_late_max_inflight)

    def consume_reconcile_close(self, fields: dict[bytes, bytes]) -> None:
        plan_data = {k.decode(): v.decode() for k, v in fields.items()}
        symbol, plan_id = plan_data.get("symbol"), plan_data.get("plan_id", "")
        if self.p28_enabled and heat_observer and plan_id and symbol:
            decision = plan_data.get("decision", "UNKNOWN")
            heat_observer.observe(
                redis_client=self.redis, plan_id=plan_id, symbol=symbol, apply_decision=decision,
                obs_point="reconcile_close_consume", enabled=self.p28_enabled, stream_name=self.p28_stream,
                lookup_prefix=self.p28_lookup_prefix, dedupe_ttl_sec=self.p28_dedupe_ttl,
                max_debug_chars=self.p28_max_debug)


#: (plan, decision, when HeatBridge writes its heat: before publish_plan, after it, or never).
PLANS = [(f"mig-{d.name.lower()}-{when}", d, when) for d in Decision for when in ("before", "after", "never")]


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_the_three_call_sites_record_one_entry_per_point(request: pytest.FixtureRequest, broker: str,
                                                         r: redis.Redis, env: dict[str, str],
                                                         start_worker: Callable[..., Worker]) -> None:
    if broker == "amqp":
        request.getfixturevalue("amqp_broker")
    env.update(P28_LATE_OBS_MAX_WAIT_MS="1000")
    start_worker()
    apply = ApplyLayer(r)  # its own client, passed as it always was (the observer uses its own)
    heat = {"heat_level": "warm", "heat_score": "0.42", "heat_action": "DOWNGRADE_FULL_TO_PARTIAL",
            "out_action": "PARTIAL", "recommended_partial": "0.5"}
    for plan_id, decision, when in PLANS:
        apply.create_apply_plan(plan_id, "BTCUSDT", decision)
        if when == "before":
            r.hset(HEAT + plan_id, mapping=heat)
        apply.publish_plan(plan_id, "BTCUSDT", decision.value)
        if when == "after":
            r.hset(HEAT + plan_id, mapping=heat)
    # The reconcile-close consumer reads the RECONCILE_CLOSE plans back from the apply layer's plan stream.
    for plan_id, decision, _when in PLANS:
        if decision is Decision.RECONCILE_CLOSE:
            r.xadd("quantum:stream:apply.plan", {"plan_id": plan_id, "symbol": "BTCUSDT", "decision": decision.value})
    for _id, fields in r.xrange("quantum:stream:apply.plan"):
        apply.consume_reconcile_close(fields)

    reconciled = [p for p, d, _ in PLANS if d is Decision.RECONCILE_CLOSE]
    expected_entries = 2 * len(PLANS) + len(reconciled)
    entries = poll(lambda: (e := stream_entries(r, STREAM)) and len(e) >= expected_entries and e, 30, 0.1,
                   f"{expected_entries} entries")
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for e in entries:
        key = (e["plan_id"], e["obs_point"])
        assert key not in seen, f"{key} recorded twice"
        seen[key] = e
    for plan_id, decision, when in PLANS:
        early, late = seen[(plan_id, "create_apply_plan")], seen[(plan_id, "publish_plan_post")]
        assert early["apply_decision"] == late["apply_decision"] == decision.value
        assert early["heat_reason"] == "missing"  # HeatBridge had not written yet at create_apply_plan
        if when == "never":
            assert (late["heat_reason"], late["heat_found"]) == ("timeout", "0")
        else:
            assert (late["heat_reason"], late["heat_level"], late["heat_score"], late["heat_out_action"]) == (
                "ok", "warm", "0.42", "PARTIAL")
            assert late["recorded_by"] == ("admit" if when == "before" else "wake")
    for plan_id in reconciled:
        entry = seen[(plan_id, "reconcile_close_consume")]
        assert entry["apply_decision"] == "RECONCILE_CLOSE"
        assert entry["heat_reason"] == ("missing" if plan_id.endswith("never") else "ok")
    assert len(seen) == expected_entries
    assert_counters_match_the_stream(r)
