"""The apply layer's inputs, checked before anything reaches Redis: plan id, symbol, decision, observation point.

Plan ids become parts of keys, so an id that could reach a key outside the configured prefixes (``*``, ``:``,
spaces, control characters, non-ASCII) or that is absurdly long is refused; decisions and symbols go into the
lease, so they are held to their characters. A refused input is counted (``invalid_input``), never rewritten.
"""

from __future__ import annotations

import enum
import re

PLAN_ID_MAX = 128
_PLAN_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.\-]{{0,{PLAN_ID_MAX - 1}}}")
#: Longest symbol accepted from the apply layer (characters).
MAX_SYMBOL = 32
#: The replaced apply layer's decisions (its Decision enum), and UNKNOWN where it had none: recorded as passed.
KNOWN_DECISIONS = ("EXECUTE", "SKIP", "BLOCKED", "ERROR", "RECONCILE_CLOSE", "UNKNOWN")
#: Any other decision is recorded as passed when it is at most this long, of these characters; else refused.
MAX_DECISION = 32
_DECISION = re.compile(rf"[A-Za-z0-9_.\-]{{0,{MAX_DECISION}}}")


class InvalidInput(ValueError):
    """A plan id, symbol, decision, observation point or task argument the observer refuses (one line)."""


def _shown(value: object) -> str:
    text = repr(value)
    return text[:60] + ("..." if len(text) > 60 else "")


def valid_plan_id(plan_id: object) -> bool:
    return isinstance(plan_id, str) and _PLAN_ID.fullmatch(plan_id) is not None


def check_plan_id(plan_id: object) -> str:
    if not valid_plan_id(plan_id):
        raise InvalidInput(f"plan_id {_shown(plan_id)} is not 1-{PLAN_ID_MAX} characters of A-Z a-z 0-9 _ . - "
                           "(starting with a letter or digit)")
    return plan_id  # type: ignore[return-value]


def check_symbol(symbol: object) -> str:
    if not isinstance(symbol, str) or not (0 < len(symbol) <= MAX_SYMBOL) or not symbol.isascii() \
            or not all(ch.isalnum() or ch in "_-./" for ch in symbol):
        raise InvalidInput(f"symbol {str(symbol)[:40]!r} is not 1-{MAX_SYMBOL} characters of A-Z a-z 0-9 _ - . /")
    return symbol


def check_decision(decision: object) -> str:
    """The apply decision as passed (an Enum gives its value; None is empty); refused when it is not at most
    MAX_DECISION characters of A-Z a-z 0-9 _ . -"""
    if decision is None:
        return ""
    if isinstance(decision, enum.Enum):
        decision = decision.value
    if not isinstance(decision, str) or not _DECISION.fullmatch(decision):
        raise InvalidInput(f"apply_decision {_shown(decision)} is not 0-{MAX_DECISION} characters of "
                           "A-Z a-z 0-9 _ . -")
    return decision


def check_obs_point(obs_point: object, configured: tuple[str, ...]) -> str:
    """An early observation point of the configured set (P28_HEAT_OBS_POINTS), never another."""
    if not isinstance(obs_point, str) or obs_point not in configured:
        raise InvalidInput(f"obs_point {_shown(obs_point)} is not one of P28_HEAT_OBS_POINTS ({','.join(configured)})")
    return obs_point


def plan_of_heat_key(key: bytes | str, prefix: str) -> str | None:
    """The plan id of a heat key, or None for a key that is not one (another prefix, a bad id)."""
    text = key.decode(errors="replace") if isinstance(key, bytes) else key
    plan_id = text[len(prefix):] if text.startswith(prefix) else None
    return plan_id if valid_plan_id(plan_id) else None
