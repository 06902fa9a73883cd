"""Reading a heat hash into stream fields, and building the stream entry.

A heat record is "found" when its hash has at least one field. It is a
``parse_error`` when it exists but cannot be read: a key of another Redis type,
values that are not UTF-8, an unknown heat_level/heat_action, a number that is
not a number, or a value too long to copy. Nothing here talks to Redis.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

HEAT_LEVELS = frozenset({"cold", "warm", "hot", "unknown"})
HEAT_ACTIONS = frozenset({"NONE", "DOWNGRADE_FULL_TO_PARTIAL", "HOLD_CLOSE"})
APPLY_DECISIONS = frozenset({"EXECUTE", "SKIP", "BLOCKED", "UNKNOWN"})
#: Longest heat value copied into the stream; longer ones make the record unreadable.
MAX_COPIED_VALUE = 64
#: Longest symbol accepted from the apply layer (characters).
MAX_SYMBOL = 32

#: Stream field -> heat hash field, in the contract's order.
COPIED = (
    ("heat_ts_epoch", "ts_epoch"),
    ("heat_level", "heat_level"),
    ("heat_score", "heat_score"),
    ("heat_action", "heat_action"),
    ("heat_out_action", "out_action"),
    ("heat_recommended_partial", "recommended_partial"),
)
NUMERIC = frozenset({"ts_epoch", "heat_score"})


@dataclass
class Heat:
    """What one look at the heat hash saw."""

    found: bool
    reason: str  # ok, parse_error, or '' when nothing was found
    copied: dict[str, str] = field(default_factory=dict)
    debug: dict[str, Any] = field(default_factory=dict)


def read_heat(raw: dict[bytes, bytes]) -> Heat:
    """Turn HGETALL's reply into the fields the stream copies."""
    if not raw:
        return Heat(found=False, reason="")
    try:
        record = {k.decode(): v.decode() for k, v in raw.items()}
    except UnicodeDecodeError:
        return Heat(found=True, reason="parse_error", debug={"parse": "heat hash is not UTF-8"})
    copied = {}
    for stream_field, hash_field in COPIED:
        value = record.get(hash_field, "")
        problem = _problem(hash_field, value)
        if problem:
            return Heat(found=True, reason="parse_error", debug={"parse": f"{hash_field}: {problem}"})
        copied[stream_field] = value
    debug = {k: record[k] for k in ("reason", "mode", "debug_json") if record.get(k)}
    return Heat(found=True, reason="ok", copied=copied, debug=debug)


def _problem(name: str, value: str) -> str:
    if len(value) > MAX_COPIED_VALUE:
        return f"longer than {MAX_COPIED_VALUE} characters"
    if not value:
        return ""
    if name == "heat_level" and value not in HEAT_LEVELS:
        return f"unknown level {value!r}"
    if name == "heat_action" and value not in HEAT_ACTIONS:
        return f"unknown action {value!r}"
    if name in NUMERIC:
        try:
            if not math.isfinite(float(value)):
                return "not a finite number"
        except ValueError:
            return "not a number"
    return ""


def normalise_decision(decision: object) -> str:
    """The apply decision as the contract lists it; anything unrecognised is UNKNOWN."""
    if decision is None or decision == "":
        return ""
    text = str(decision).strip().upper()
    return text if text in APPLY_DECISIONS else "UNKNOWN"


def check_symbol(symbol: object) -> str:
    if not isinstance(symbol, str) or not (0 < len(symbol) <= MAX_SYMBOL) or not symbol.isascii() \
            or not all(ch.isalnum() or ch in "_-./" for ch in symbol):
        from .keys import InvalidInput

        raise InvalidInput(f"symbol {str(symbol)[:40]!r} is not 1-{MAX_SYMBOL} characters of A-Z a-z 0-9 _ - . /")
    return symbol


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def cap_debug(context: dict[str, Any], limit: int) -> str:
    """Compact JSON of context, at most limit characters, still valid JSON."""
    text = _dumps(context)
    if len(text) <= limit:
        return text
    kept: dict[str, Any] = {"truncated": True}
    for key, value in context.items():
        if len(_dumps({**kept, key: value})) <= limit:
            kept[key] = value
        elif isinstance(value, str):
            # Keep the head of the string; escaping changes its JSON length, so shrink until it fits.
            cut = value[: max(0, limit - len(_dumps({**kept, key: ""})))]
            while cut and len(_dumps({**kept, key: cut})) > limit:
                cut = cut[: len(cut) * 7 // 8]
            if cut:
                kept[key] = cut
    text = _dumps(kept)
    return text if len(text) <= limit else "{}"


def entry_fields(
    *,
    ts_epoch: float,
    plan_id: str,
    symbol: str,
    obs_point: str,
    heat: Heat,
    reason: str,
    apply_decision: str,
    debug_json: str,
    extra: dict[str, str] | None = None,
) -> list[str]:
    """The stream entry as a flat field/value list, in the contract's order."""
    pairs = [
        ("ts_epoch", f"{ts_epoch:.3f}"),
        ("plan_id", plan_id),
        ("symbol", symbol),
        ("apply_component", "apply"),
        ("obs_point", obs_point),
        ("heat_found", "1" if reason == "ok" else "0"),
    ]
    pairs += [(name, heat.copied.get(name, "")) for name, _ in COPIED]
    pairs += [("heat_reason", reason), ("apply_decision", apply_decision), ("debug_json", debug_json)]
    pairs += list((extra or {}).items())
    return [item for pair in pairs for item in pair]
