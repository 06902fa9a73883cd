"""A call of the apply layer as the outbox keeps it, and the status word of a step's reply to it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.settings import LATE_POINT


@dataclass
class Call:
    """A call the outbox keeps (held until Redis can take it, or made and kept for the recheck): what to make,
    when the caller made it (monotonic s), and whether an attempt was sent whose reply was lost (so Redis may
    have made it: making it again must find that)."""

    obs_point: str
    plan_id: str
    symbol: str
    decision: str
    token: str
    since: float
    attempted: bool = False

    @property
    def late(self) -> bool:
        return self.obs_point == LATE_POINT


def status_of(call: Call, reply: Any) -> str:
    """A step's status word: an admission's first field (admitted, kept, ...), an early call's reply (its reason,
    or duplicate)."""
    status = reply[0] if call.late else reply
    return status.decode() if isinstance(status, bytes) else str(status)
