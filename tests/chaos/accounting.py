"""Matching the counts that say "given up" to the plans and calls that need one, by time.

Counters name no plan. What they do tell is when they grew: the harness reads a worker's /metrics every
second during the run (``metrics_timeline.jsonl``), so each unit of a count has a time it was first seen.
A count can only be written after the call it counts, so a claimant (a call, at its start time) may take
a unit first seen at or after that time. Units are matched so that as many claimants as possible get one
(claimants latest first, each taking the earliest unit not before it). Units seen and then gone again (a
scrape that read a master whose data did not survive) are taken back, latest first; units the last scrape
had not seen yet (written in the drain) count as seen at the end. Without a timeline every unit is seen
"at the end", and the matching is by call order alone.

The total of unmatched claimants is exact; which claimant goes unmatched when units run short is decided by
time, which is why the timeline is worth having: a failover that loses counts in one minute does not make
the plans of a clean outage a minute later look uncounted.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable
from typing import Any

#: Series = (sample name, sorted label pairs), as evidence.parse_metrics keys them.
Values = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def arrivals(timeline: list[tuple[float, Values]], select: Callable[[str, dict[str, str]], bool],
             start: float, end: float) -> list[float]:
    """The times the selected series' units were first seen, ``end - start`` of them (the run's increase)."""
    def total(values: Values) -> float:
        return sum(v for (name, labels), v in values.items() if select(name, dict(labels)))

    units: list[float] = []
    last = start
    for t, values in timeline:
        if not any(select(name, dict(labels)) for name, labels in values):
            continue  # a page without these counters (Redis unreadable): no reading, not a zero
        now = total(values)
        if now > last:
            units += [t] * int(round(now - last))
        elif now < last:  # seen, then gone: take back the latest
            del units[max(0, len(units) - int(round(last - now))):]
        last = now
    wanted = max(0, int(round(end - start)))
    if len(units) > wanted:  # more seen than the final page holds: the latest did not survive
        del units[wanted:]
    return units + [math.inf] * (wanted - len(units))


def match(claimants: Iterable[tuple[float, Any]], units: list[float]) -> tuple[list[Any], list[float]]:
    """(unmatched claimants, units left): each claimant (time, item), latest first, takes the earliest unit
    at or after its time."""
    free = sorted(units)
    unmatched = []
    for t, item in sorted(claimants, key=lambda c: c[0], reverse=True):
        i = bisect.bisect_left(free, t)
        if i < len(free):
            free.pop(i)
        else:
            unmatched.append(item)
    return unmatched, free
