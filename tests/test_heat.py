"""Reading heat hashes and building stream entries (pure logic, plain values)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from observer_tasks.heat import Heat, cap_debug, entry_fields, normalise_decision, read_heat
from observer_tasks.keys import InvalidInput, check_plan_id

CONTRACT_ORDER = [
    "ts_epoch", "plan_id", "symbol", "apply_component", "obs_point", "heat_found", "heat_ts_epoch", "heat_level",
    "heat_score", "heat_action", "heat_out_action", "heat_recommended_partial", "heat_reason", "apply_decision",
    "debug_json",
]


def test_missing_and_found() -> None:
    assert read_heat({}) == Heat(found=False, reason="")
    heat = read_heat({b"heat_level": b"hot", b"heat_action": b"HOLD_CLOSE", b"ts_epoch": b"1700000000.5",
                      b"out_action": b"PARTIAL", b"recommended_partial": b"0.5", b"reason": b"vol", b"mode": b"live"})
    assert heat.found and heat.reason == "ok"
    assert heat.copied == {"heat_ts_epoch": "1700000000.5", "heat_level": "hot", "heat_score": "",
                           "heat_action": "HOLD_CLOSE", "heat_out_action": "PARTIAL", "heat_recommended_partial": "0.5"}
    assert heat.debug == {"reason": "vol", "mode": "live"}


@pytest.mark.parametrize("raw", [
    {b"heat_level": b"\xff\xfe"},
    {b"heat_level": b"boiling"},
    {b"heat_action": b"SELL"},
    {b"heat_score": b"high"},
    {b"ts_epoch": b"nan"},
    {b"heat_score": b"1" * 65},
])
def test_unreadable_records_are_parse_errors(raw: dict[bytes, bytes]) -> None:
    heat = read_heat(raw)
    assert heat.found and heat.reason == "parse_error" and heat.copied == {}


def test_entry_fields_follow_the_contract_order() -> None:
    fields = entry_fields(ts_epoch=1.0, plan_id="p", symbol="BTCUSDT", obs_point="publish_plan_post",
                          heat=Heat(False, ""), reason="timeout", apply_decision="SKIP", debug_json="{}",
                          extra={"wait_ms": "5", "polls": "2"})
    names = fields[0::2]
    assert names == [*CONTRACT_ORDER, "wait_ms", "polls"]
    assert names.index("obs_point") < names.index("heat_found")
    assert dict(zip(fields[0::2], fields[1::2], strict=True))["heat_found"] == "0"


def test_decisions() -> None:
    assert [normalise_decision(d) for d in ("EXECUTE", "skip", "", None, "weird")] == ["EXECUTE", "SKIP", "", "",
                                                                                         "UNKNOWN"]


@pytest.mark.parametrize("bad", ["", " ", "a" * 129, "a*", "a:b", "a\nb", "é", "-lead", b"bytes", 42, None, "a b"])
def test_plan_ids_refused(bad: object) -> None:
    with pytest.raises(InvalidInput):
        check_plan_id(bad)


def test_plan_ids_accepted() -> None:
    for ok in ("p1", "a" * 128, "PLAN-2026.11_28"):
        assert check_plan_id(ok) == ok


@given(st.dictionaries(st.text(max_size=12), st.one_of(st.text(max_size=600), st.integers(), st.none()), max_size=8),
       st.integers(min_value=2, max_value=500))
def test_cap_debug_is_valid_json_within_the_limit(context: dict[str, object], limit: int) -> None:
    text = cap_debug(context, limit)
    assert len(text) <= limit
    assert isinstance(json.loads(text), dict)


@given(st.dictionaries(st.binary(max_size=20), st.binary(max_size=80), max_size=12))
def test_any_hash_reads_as_ok_parse_error_or_missing(raw: dict[bytes, bytes]) -> None:
    heat = read_heat(raw)
    assert heat.reason in (("ok", "parse_error") if raw else ("",))
    assert all(len(v) <= 64 for v in heat.copied.values())


@given(st.one_of(st.text(max_size=200), st.binary(max_size=50), st.integers(), st.none()))
def test_plan_id_check_never_lets_key_syntax_through(plan_id: object) -> None:
    try:
        checked = check_plan_id(plan_id)
    except InvalidInput:
        return
    assert checked.isascii() and not set(checked) & set("*:?[] \n\r\t{}") and 0 < len(checked) <= 128
