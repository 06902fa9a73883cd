"""The apply layer's inputs (symbol, apply decision) and the heat record's closed vocabularies.

Reading a heat hash happens inside Redis, in the observe steps' Lua (one atomic step with the record): a record
is "found" when its key exists, and a ``parse_error`` when it exists but cannot be read: a key of another Redis
type, or a field the contract uses (read with HMGET: nothing else in the hash is read) that is not UTF-8, an
unknown heat_level/heat_action, a number that is not a number, or a copied value longer than 64 characters (the
script's LEVELS, ACTIONS and MAX_COPIED are the one place). A debug field (reason, mode, debug_json) longer than
P28_MAX_DEBUG_CHARS could never fit in debug_json, so it is dropped unread.
"""

from __future__ import annotations

from .keys import InvalidInput

APPLY_DECISIONS = frozenset({"EXECUTE", "SKIP", "BLOCKED", "UNKNOWN"})
#: Longest symbol accepted from the apply layer (characters).
MAX_SYMBOL = 32


def normalise_decision(decision: object) -> str:
    """The apply decision as the contract lists it; anything unrecognised is UNKNOWN."""
    if decision is None or decision == "":
        return ""
    text = str(decision).strip().upper()
    return text if text in APPLY_DECISIONS else "UNKNOWN"


def check_symbol(symbol: object) -> str:
    if not isinstance(symbol, str) or not (0 < len(symbol) <= MAX_SYMBOL) or not symbol.isascii() \
            or not all(ch.isalnum() or ch in "_-./" for ch in symbol):
        raise InvalidInput(f"symbol {str(symbol)[:40]!r} is not 1-{MAX_SYMBOL} characters of A-Z a-z 0-9 _ - . /")
    return symbol
