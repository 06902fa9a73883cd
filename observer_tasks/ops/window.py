"""What happened lately: the counters read twice, a window apart, and the Redis gaps the workers recorded.

The counters are cumulative (contract.COUNTERS; every family a sum of its fields, metrics.tally), so what
happened in a window is the difference of two reads, both dated by Redis's TIME: drops, refusals and records
of the last seconds, not of the observer's lifetime. `verify` and `status` read them the same way.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis

from ..core import contract as C
from ..core.settings import LATE_POINT, Settings
from ..worker.metrics import Tally, read_counters, tally
from .probes import redis_now_ms


@dataclass(frozen=True)
class Snapshot:
    """Every family's value at one moment (Redis ms)."""

    now_ms: int
    counts: Tally


def snapshot(client: redis.Redis, settings: Settings) -> Snapshot:
    return Snapshot(redis_now_ms(client), tally(read_counters(client), settings))


@dataclass(frozen=True)
class Window:
    """The difference of two snapshots: what moved between them (a counter that went down was reset: its
    value after the reset is what moved, as Prometheus reads a reset)."""

    before: Snapshot
    after: Snapshot

    @property
    def seconds(self) -> float:
        return max(0.001, (self.after.now_ms - self.before.now_ms) / 1000)

    def moved(self, family: str) -> Counter[tuple[str, ...]]:
        """Each series of the family that moved, by how much."""
        old, new = self.before.counts.samples[family], self.after.counts.samples[family]
        out: Counter[tuple[str, ...]] = Counter()
        for labels, value in new.items():
            out[labels] = value - old[labels] if value >= old[labels] else value
        return +out

    def total(self, family: str) -> int:
        """How much the family moved, all series together."""
        return sum(self.moved(family).values())

    def lifetime(self, family: str) -> int:
        return sum(self.after.counts.samples[family].values())

    @property
    def dropped(self) -> int:
        return self.total("p28_late_obs_dropped")

    @property
    def refused(self) -> Counter[tuple[str, ...]]:
        """(obs_point, cause) -> calls refused in the window."""
        return self.moved("p28_observe_refused")

    def rate(self, n: float) -> float:
        return n / self.seconds

    def late_reasons(self) -> dict[str, int]:
        """publish_plan_post records in the window by reason (reasons that did not move left out)."""
        moved = self.moved("p28_heat_reason")
        return {reason: moved[(LATE_POINT, reason)] for reason in C.REASONS if moved[(LATE_POINT, reason)]}

    def coverage(self, points: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Per observation point, the plans of the window: recorded with heat found and without, dropped at
        admission (publish_plan_post) and refused: a dropped or refused plan was not observed, so it counts
        against the coverage."""
        observed, refused = self.moved("p28_observed"), self.refused
        out = {}
        for point in points:
            found, missed = observed[(point, "1")], observed[(point, "0")]
            dropped = self.dropped if point == LATE_POINT else 0
            refusals = sum(n for (p, _cause), n in refused.items() if p == point)
            total = found + missed + dropped + refusals
            out[point] = {"found": found, "not_found": missed, "dropped": dropped, "refused": refusals,
                          "total": total, "coverage_pct": round(100 * found / total, 1) if total else None}
        return out

    def plans(self, points: Iterable[str]) -> int:
        """How many plans the window saw at any point (recorded, dropped or refused)."""
        return sum(c["total"] for c in self.coverage(points).values())


def measure(client: redis.Redis, settings: Settings, seconds: float,
            meanwhile: Callable[[Snapshot], Any] = lambda _before: None) -> tuple[Window, Any]:
    """Read the counters, run ``meanwhile`` (the command's other questions; it gets the first read), wait out
    the rest of the window and read them again. Returns the window and what ``meanwhile`` returned."""
    end = time.monotonic() + seconds
    before = snapshot(client, settings)
    result = meanwhile(before)
    time.sleep(max(0.0, end - time.monotonic()))  # the window itself: what this command is asked to watch
    return Window(before, snapshot(client, settings)), result


def refusals_text(refused: Counter[tuple[str, ...]]) -> str:
    """'backlog 12 (publish_plan_post), invalid_input 1 (create_apply_plan)', most first."""
    return ", ".join(f"{cause} {n} ({point})" for (point, cause), n in refused.most_common())


# -- the Redis gaps the workers recorded (contract.GAPS: "start-end" -> end, Redis ms) ---------------------------


@dataclass(frozen=True)
class Gap:
    start_ms: int
    end_ms: int


def gaps_since(client: redis.Redis, since_ms: int) -> list[Gap] | None:
    """The gaps that ended at or after ``since_ms``, oldest first; None when this Redis user may not read them
    (an ACL older than deploy/redis/users.acl's ZRANGEBYSCORE for the operator's user)."""
    try:
        members = client.zrangebyscore(C.GAPS, since_ms, "+inf")
    except redis.exceptions.NoPermissionError:
        return None
    out = []
    for member in members:
        start, _, end = member.decode(errors="replace").partition("-")
        if start.isdigit() and end.isdigit():
            out.append(Gap(int(start), int(end)))
    return out


def gap_ended_within(client: redis.Redis, now_ms: int, within_ms: int) -> bool:
    """Whether a recorded gap ended within ``within_ms`` before ``now_ms`` (ZCOUNT: the operator's user may)."""
    return bool(client.zcount(C.GAPS, now_ms - within_ms, "+inf"))
