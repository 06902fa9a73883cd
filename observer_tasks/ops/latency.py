"""`observer-tasks latency`: how long heat takes to come, and the MAX_WAIT_MS that catches it.

The recommendation is derived so that a steady workload keeps one value: not from the newest entries' p99
(a few hundred hits, whose tail is a handful of samples: it swung 1800 / 2000 / 2100 on one workload) but
from the all-time heat-wait histogram the workers keep in Redis (contract.COUNTERS, metrics.tally: every hit
ever, /metrics' p28_late_obs_heat_wait_seconds), with hysteresis around the MAX_WAIT_MS in force:

- the wait needed is the histogram's p99 (interpolated within its bucket, as Prometheus' histogram_quantile)
  x MARGIN, at least two polls;
- MAX_WAIT_MS is kept while the need lies between half of it and it;
- above it (the hits reach the deadline: the tail beyond is cut off), the runbook's next step
  (2000 -> 3000 -> 4000), one at a time, while drops are 0; none past its last step;
- below half of it, the smallest step that holds the need (500, 1000, 2000, 3000 ...): a value then kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import click

from ..core import contract as C
from . import limits as L
from . import probes as P
from .reports import histogram_rows, late_waits, latency_rows, percentiles, table

#: The wait needed is the p99 of hits times this.
MARGIN = 1.25
#: Fewer hits than this in the histogram say little about a p99: no recommendation yet.
MIN_HITS = 100
#: The runbook's MAX_WAIT_MS steps (2000 -> 3000 -> 4000): one second at a time, up to the last step; below a
#: second, half of one.
WAIT_STEP_MS = 1000
WAIT_LAST_STEP_MS = 4000
WAIT_LOWEST_STEP_MS = 500


def next_wait_step(wait_ms: int) -> int | None:
    """The runbook's next MAX_WAIT_MS step (2000 -> 3000 -> 4000), or None at or past the last one."""
    if wait_ms >= WAIT_LAST_STEP_MS:
        return None
    return (wait_ms // WAIT_STEP_MS + 1) * WAIT_STEP_MS


def step_holding(need_ms: float) -> int:
    """The smallest runbook step at least ``need_ms``: 500, then whole seconds."""
    if need_ms <= WAIT_LOWEST_STEP_MS:
        return WAIT_LOWEST_STEP_MS
    return math.ceil(need_ms / WAIT_STEP_MS) * WAIT_STEP_MS


def raise_wait_text(wait_ms: int) -> str:
    step = next_wait_step(wait_ms)
    if step is None:
        return (f"P28_LATE_OBS_MAX_WAIT_MS={wait_ms} is at or past the runbook's last step ({WAIT_LAST_STEP_MS}): "
                "do not raise it further, look at HeatBridge's lag")
    return f"raise P28_LATE_OBS_MAX_WAIT_MS to {step} (the runbook's steps: 2000 -> 3000 -> 4000)"


def histogram_quantile(q: float, buckets: Sequence[tuple[str, float]]) -> tuple[float, bool] | None:
    """The q-quantile (ms) of a cumulative histogram ((le in seconds as text, count), +Inf last), linear within
    the bucket that holds it, and whether it lies in the +Inf bucket (then the last finite bound). None: empty."""
    total = buckets[-1][1] if buckets else 0
    if not total:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for le, cumulative in buckets:
        if cumulative >= rank:
            if le == "+Inf":
                return lower, True
            upper = float(le) * 1000
            return lower + (upper - lower) * (rank - below) / (cumulative - below), False
        lower, below = (lower if le == "+Inf" else float(le) * 1000), cumulative
    return lower, True


class Recommendation(NamedTuple):
    wait_ms: int | None  # None: no recommendation yet
    action: str  # keep | raise | last | lower | none
    need_ms: int | None
    p99_ms: float | None


def recommend(buckets: Sequence[tuple[str, float]], hits: int, wait_ms: int, poll_ms: int,
              floor_ms: int = 0) -> Recommendation:
    """MAX_WAIT_MS for the all-time histogram of hits, given the one in force (the module's docstring).
    ``floor_ms``: a value it may not go below (an explicit P28_LATE_OBS_SAFETY_POLL_MS)."""
    q = histogram_quantile(0.99, buckets) if hits >= MIN_HITS else None
    if q is None:
        return Recommendation(None, "none", None, None)
    p99, beyond = q
    need = max(2 * poll_ms, math.ceil(p99 * MARGIN))
    if beyond or need > wait_ms:
        step = next_wait_step(wait_ms)
        return Recommendation(wait_ms, "last", need, p99) if step is None else Recommendation(step, "raise", need, p99)
    lower = step_holding(max(need, floor_ms))
    if need <= wait_ms / 2 and lower < wait_ms:
        return Recommendation(lower, "lower", need, p99)
    return Recommendation(wait_ms, "keep", need, p99)


def recommendation_lines(r: Recommendation, hits: int, wait_ms: int, source: str) -> list[str]:
    """The recommendation, why, and how it is derived."""
    head = "recommended P28_LATE_OBS_MAX_WAIT_MS"
    if r.action == "none":
        return [f"{head}: none yet: {hits} hits in the all-time histogram, fewer than {MIN_HITS} (too few for a p99)"]
    need = f"the wait needed, {r.need_ms} ms,"
    lines = [{
        "keep": f"{head}={r.wait_ms}: keep it ({need} lies between half of MAX_WAIT_MS={wait_ms} and it)",
        "raise": f"{head}={r.wait_ms}: {need} is above MAX_WAIT_MS={wait_ms} (hits reach the deadline: the tail "
                 f"beyond it is cut off): {raise_wait_text(wait_ms)}, only while drops are 0, then measure again",
        "last": f"{head}={r.wait_ms}: {need} is above it, but {raise_wait_text(wait_ms)}",
        "lower": f"{head}={r.wait_ms}: it can be lowered ({need} is below half of MAX_WAIT_MS={wait_ms}; "
                 "a shorter wait keeps fewer plans in flight)",
    }[r.action]]
    lines.append(f"  how: p99 of the all-time heat-wait histogram ({hits} hits) {r.p99_ms:.0f} ms x {MARGIN} = the "
                 f"wait needed; MAX_WAIT_MS ({source}) is kept while the need is between half of it and it, raised "
                 "one runbook step when the need is above it, lowered to the smallest step holding it (500, 1000, "
                 "2000, 3000 ...) when it is below half: a steady workload keeps one value")
    return lines


def headroom_line(hits: dict[str, int] | None, wait_ms: int) -> str:
    if not hits:
        return "no publish_plan_post hits yet among the recent entries"
    p99 = hits["p99"]
    return (f"headroom: p99 of hits {p99} ms is {wait_ms - p99} ms ({100 * (wait_ms - p99) / wait_ms:.1f}%) "
            f"below MAX_WAIT_MS={wait_ms}")


@click.command()
@click.option("--count", default=2000, show_default=True, type=click.IntRange(1),
              help="how many of the newest stream entries to read (XREVRANGE COUNT)")
def latency(count: int) -> None:
    """Publish -> observation latency of the late observer, and a recommended MAX_WAIT_MS.

    Reads wait_ms of the publish_plan_post entries among the newest COUNT
    stream entries: percentiles of the hits (heat found) and of the timeouts,
    and the headroom of the hits' p99 below MAX_WAIT_MS. The recommended
    MAX_WAIT_MS comes from the all-time heat-wait histogram the workers keep in
    Redis (the p28_late_obs_heat_wait_seconds family of /metrics), so a steady
    workload keeps one value: its p99 x 1.25 is the wait needed; MAX_WAIT_MS
    (the running apply layers', else this environment's) is kept while the need
    lies between half of it and it, raised one runbook step (2000 -> 3000 ->
    4000) when it is above, lowered to the smallest step holding it (500, 1000,
    2000 ...) when it is below half; none below 100 hits.

    \b
    Examples:
      observer-tasks latency
      observer-tasks latency --count 10000
    """
    settings = P.load()
    client = P.connect(settings.redis_url, settings)
    entries = P.recent(client, settings, count)
    processes = L.running(client)
    wait, source = L.in_force(processes, "max_wait_ms", settings.late_obs_max_wait_ms)
    hits, timeouts = late_waits(entries)
    click.echo(f"publish_plan_post wait_ms (last {len(entries)} entries of {settings.obs_stream}; "
               f"MAX_WAIT_MS={wait} ({source}), POLL_MS={settings.late_obs_poll_ms})")
    click.echo(table(("outcome", "n", "p50", "p90", "p95", "p99", "max"), latency_rows(hits, timeouts)))
    click.echo("")
    click.echo(headroom_line(percentiles(hits), wait))
    buckets, total, seconds = P.heat_wait_histogram(settings, client)
    r = recommend(buckets, total, wait, settings.late_obs_poll_ms, settings.late_obs_safety_poll_ms)
    for line in recommendation_lines(r, total, wait, source):
        click.echo(line)
    for line in L.mismatches([*processes, L.of_env(settings)]):
        click.echo(f"note: {line}")
    click.echo("")
    mean = f", mean {1000 * seconds / total:.0f} ms" if total else ""
    click.echo(f"heat-wait histogram ({C.COUNTERS}, all time: {total} hits{mean})")
    click.echo(table(("le_ms", "hits", "cumulative", "cumulative%"), histogram_rows(buckets, total)))

