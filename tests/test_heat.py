"""Reading heat hashes (inside the observe steps' Lua, against a real Redis) and the apply layer's input checks."""

from __future__ import annotations

import json

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from observer_tasks.core import contract as C
from observer_tasks.core.connections import redis_client
from observer_tasks.core.inputs import KNOWN_DECISIONS, MAX_DECISION, InvalidInput, check_decision, check_plan_id
from observer_tasks.core.ledger import Ledger
from observer_tasks.core.settings import Settings

from .conftest import DATA_URL, HEAT, STREAM, stream_entries

#: The contract's order, typed here on purpose: a test that the package's STREAM_FIELDS are the contract's.
CONTRACT_ORDER = [
    "ts_epoch", "plan_id", "symbol", "apply_component", "obs_point", "heat_found", "heat_ts_epoch", "heat_level",
    "heat_score", "heat_action", "heat_out_action", "heat_recommended_partial", "heat_reason", "apply_decision",
    "debug_json",
]
EARLY = Settings().early_points[0]


def make_ledger(env: dict[str, str], **overrides: str) -> Ledger:
    return Ledger(Settings.from_env({**env, **overrides}), redis_client(DATA_URL, 1.0, "test"))


def read(r: redis.Redis, ledger: Ledger, raw: dict[bytes, bytes], plan: str = "p1") -> dict[str, str]:
    """Write raw as the plan's heat hash, run the early observer on it, return the entry."""
    r.delete(HEAT + plan, C.dedupe_key(EARLY, plan), STREAM)
    if raw:
        r.hset(HEAT + plan, mapping=raw)  # type: ignore[arg-type]
    ledger.early(plan, "BTCUSDT", "EXECUTE", EARLY)
    (entry,) = stream_entries(r)
    return entry


def test_missing_and_found(r: redis.Redis, env: dict[str, str]) -> None:
    ledger = make_ledger(env)
    assert read(r, ledger, {})["heat_reason"] == "missing"
    entry = read(r, ledger, {b"heat_level": b"hot", b"heat_action": b"HOLD_CLOSE", b"ts_epoch": b"1700000000.5",
                            b"out_action": b"PARTIAL", b"recommended_partial": b"0.5", b"reason": b"vol",
                            b"mode": b"live"})
    assert (entry["heat_found"], entry["heat_reason"]) == ("1", "ok")
    assert {k: entry[k] for k in CONTRACT_ORDER[6:12]} == {
        "heat_ts_epoch": "1700000000.5", "heat_level": "hot", "heat_score": "", "heat_action": "HOLD_CLOSE",
        "heat_out_action": "PARTIAL", "heat_recommended_partial": "0.5"}
    assert json.loads(entry["debug_json"]) == {"reason": "vol", "mode": "live"}


def test_entry_fields_follow_the_contract_order(r: redis.Redis, env: dict[str, str]) -> None:
    entry = read(r, make_ledger(env), {b"heat_level": b"cold"})
    assert list(entry) == CONTRACT_ORDER == list(C.STREAM_FIELDS)
    sec, usec = r.time()
    assert abs(float(entry["ts_epoch"]) - (sec + usec / 1e6)) < 2  # Redis's clock, not the host's


@pytest.mark.parametrize("raw", [
    {b"heat_level": b"\xff\xfe"},
    {b"out_action": b"\xc3"},
    {b"heat_level": b"boiling"},
    {b"heat_action": b"SELL"},
    {b"heat_score": b"high"},
    {b"heat_score": b"0x10"},
    {b"ts_epoch": b"nan"},
    {b"ts_epoch": b"1e999"},
    {b"heat_score": b"1" * 65},
])
def test_unreadable_records_are_parse_errors(r: redis.Redis, env: dict[str, str], raw: dict[bytes, bytes]) -> None:
    entry = read(r, make_ledger(env), raw)
    assert (entry["heat_found"], entry["heat_reason"], entry["heat_level"]) == ("0", "parse_error", "")
    assert "parse" in json.loads(entry["debug_json"])


def test_wrong_type_is_a_parse_error(r: redis.Redis, env: dict[str, str]) -> None:
    r.sadd(HEAT + "p1", "member")
    make_ledger(env).early("p1", "BTCUSDT", "", EARLY)
    (entry,) = stream_entries(r)
    assert entry["heat_reason"] == "parse_error" and "WRONGTYPE" in entry["debug_json"]


def test_decisions_are_taken_as_passed() -> None:
    """Round-4 migration change 5: recorded as passed (no upper-casing, no UNKNOWN), refused when not 0-32
    characters of A-Z a-z 0-9 _ . - (was: upper-cased, anything else UNKNOWN)."""
    import enum

    class Decision(enum.Enum):  # the replaced apply layer passes its enum's members
        RECONCILE_CLOSE = "RECONCILE_CLOSE"

    passed = ["EXECUTE", "skip", "", "weird", "RECONCILE_CLOSE", "a.b-c_9", "x" * MAX_DECISION, *KNOWN_DECISIONS]
    assert [check_decision(d) for d in passed] == passed
    assert (check_decision(None), check_decision(Decision.RECONCILE_CLOSE)) == ("", "RECONCILE_CLOSE")
    for bad in ("x" * (MAX_DECISION + 1), "a b", "a:b", "é", "a\n", b"EXECUTE", 7):
        with pytest.raises(InvalidInput, match="apply_decision"):
            check_decision(bad)


@pytest.mark.parametrize("bad", ["", " ", "a" * 129, "a*", "a:b", "a\nb", "é", "-lead", b"bytes", 42, None, "a b"])
def test_plan_ids_refused(bad: object) -> None:
    with pytest.raises(InvalidInput):
        check_plan_id(bad)


def test_plan_ids_accepted() -> None:
    for ok in ("p1", "a" * 128, "PLAN-2026.11_28"):
        assert check_plan_id(ok) == ok


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=2000), st.text(max_size=300), st.integers(min_value=2, max_value=500))
def test_debug_json_is_valid_json_within_the_cap(r: redis.Redis, env: dict[str, str], debug: str, reason: str,
                                                 limit: int) -> None:
    ledger = make_ledger(env, P28_MAX_DEBUG_CHARS=str(limit))
    entry = read(r, ledger, {b"heat_level": b"warm", b"debug_json": debug.encode(), b"reason": reason.encode()})
    assert len(entry["debug_json"]) <= limit
    assert isinstance(json.loads(entry["debug_json"]), dict)


#: The heat hash's fields the observer reads (HMGET); the contract's others (symbol, plan_id, in_action) are unused.
READ_FIELDS = [b"ts_epoch", b"heat_level", b"heat_score", b"heat_action", b"out_action", b"recommended_partial",
               b"reason", b"mode", b"debug_json"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.one_of(st.sampled_from(READ_FIELDS), st.binary(min_size=1, max_size=20)),
                       st.binary(max_size=80), max_size=12))
def test_any_hash_reads_as_ok_parse_error_or_missing(r: redis.Redis, env: dict[str, str],
                                                     raw: dict[bytes, bytes]) -> None:
    entry = read(r, make_ledger(env), raw)
    assert entry["heat_reason"] in (("ok", "parse_error") if raw else ("missing",))
    assert all(len(entry[k]) <= 64 for k in CONTRACT_ORDER[6:12])
    if entry["heat_reason"] == "ok":  # what Python would accept as UTF-8, Lua accepted too
        for k in READ_FIELDS:
            raw.get(k, b"").decode()


def test_fields_outside_the_contract_are_not_read(r: redis.Redis, env: dict[str, str]) -> None:
    """HMGET of the contract's fields: whatever else HeatBridge keeps in the hash costs nothing and breaks nothing."""
    entry = read(r, make_ledger(env), {b"heat_level": b"warm", b"\xc3": b"\xff", b"blob": b"\xfe" * 100_000})
    assert (entry["heat_found"], entry["heat_reason"], entry["heat_level"]) == ("1", "ok", "warm")
    assert read(r, make_ledger(env), {b"unknown": b"x"})["heat_reason"] == "ok"  # found: the hash exists


def test_a_debug_field_too_long_to_fit_is_dropped_unread(r: redis.Redis, env: dict[str, str]) -> None:
    entry = read(r, make_ledger(env, P28_MAX_DEBUG_CHARS="100"),
                 {b"heat_level": b"hot", b"debug_json": b"\xff" * 101, b"mode": b"live"})
    assert entry["heat_reason"] == "ok"
    assert json.loads(entry["debug_json"]) == {"mode": "live", "truncated": True}


@given(st.one_of(st.text(max_size=200), st.binary(max_size=50), st.integers(), st.none()))
def test_plan_id_check_never_lets_key_syntax_through(plan_id: object) -> None:
    try:
        checked = check_plan_id(plan_id)
    except InvalidInput:
        return
    assert checked.isascii() and not set(checked) & set("*:?[] \n\r\t{}") and 0 < len(checked) <= 128


@pytest.mark.parametrize("value", [b"\xe0\x80\x80", b"\xed\xa0\x80", b"\xf0\x80\x80\x80", b"\xf4\x90\x80\x80",
                                   b"\xc0\xaf", b"ok\xe2\x82", b"\xe1\x80\xc2\x80\x80"])
def test_utf8_is_checked_as_strictly_as_python(r: redis.Redis, env: dict[str, str], value: bytes) -> None:
    with pytest.raises(UnicodeDecodeError):
        value.decode()
    assert read(r, make_ledger(env), {b"reason": value})["heat_reason"] == "parse_error"


#: Bytes at the edges of UTF-8's ranges (ASCII, continuation, lead bytes and the overlong/surrogate limits).
EDGE_BYTES = [0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xDF, 0xE0, 0xE1, 0xEC, 0xED, 0xEE,
              0xEF, 0xF0, 0xF1, 0xF3, 0xF4, 0xF5, 0xFF]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(EDGE_BYTES), min_size=1, max_size=8).map(bytes))
def test_utf8_check_agrees_with_python(r: redis.Redis, env: dict[str, str], value: bytes) -> None:
    try:
        value.decode()
        expected = "ok"
    except UnicodeDecodeError:
        expected = "parse_error"
    assert read(r, make_ledger(env), {b"out_action": value})["heat_reason"] == expected
