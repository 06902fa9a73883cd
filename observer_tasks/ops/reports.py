"""Report arithmetic of the operator tools: coverage, reasons, percentiles, histograms, advice.

Pure functions over stream entries (dicts of text fields) and scraped /metrics
samples: no Redis, no broker, no click. ``cli`` and ``demo`` both import them,
so the demo's closing table and ``observer-tasks coverage`` cannot drift apart.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from ..core import contract as C
from ..core.settings import LATE_POINT, Settings
from ..core.timings import WORKER_STALE_MS

#: Above this share of timeouts the runbook says to raise MAX_WAIT_MS or look at HeatBridge.
TIMEOUT_RATE_LIMIT = 0.5
#: The runbook's MAX_WAIT_MS steps (2000 -> 3000 -> 4000): one second at a time, up to the last step.
WAIT_STEP_MS = 1000
WAIT_LAST_STEP_MS = 4000

#: A scraped /metrics page: (sample name, frozenset of label pairs) -> value.
Samples = Mapping[tuple[str, frozenset[tuple[str, str]]], float]


def table(headers: Iterable[Any], rows: Iterable[Iterable[Any]]) -> str:
    cells = [[str(c) for c in headers], *[["" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def points_of(entries: Iterable[Mapping[str, str]], configured: Iterable[str]) -> list[str]:
    """The configured observation points, then any other point the entries carry (an older configuration)."""
    points = list(configured)
    points += sorted({str(e.get("obs_point")) for e in entries} - set(points) - {"None"})
    return points


def coverage(entries: Iterable[Mapping[str, str]], points: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """Per observation point (default: the configured ones): heat found / not found, total and coverage %."""
    entries = list(entries)
    counts = Counter((e.get("obs_point"), e.get("heat_found")) for e in entries)
    out = {}
    for point in points_of(entries, Settings().obs_points if points is None else points):
        found, missed = counts[(point, "1")], counts[(point, "0")]
        total = found + missed
        out[point] = {"found": found, "not_found": missed, "total": total,
                      "coverage_pct": round(100 * found / total, 1) if total else None}
    return out


def reasons(entries: Iterable[Mapping[str, str]], points: Iterable[str] | None = None) -> dict[str, dict[str, int]]:
    """Per observation point: how many entries carry each reason (reasons never seen are left out)."""
    entries = list(entries)
    counts = Counter((e.get("obs_point"), e.get("heat_reason")) for e in entries)
    return {point: {reason: counts[(point, reason)] for reason in C.REASONS if counts[(point, reason)]}
            for point in points_of(entries, Settings().obs_points if points is None else points)}


def coverage_table(cov: Mapping[str, Mapping[str, Any]]) -> str:
    """Verification 1's table (obs_point heat_found count), with the coverage on the hit rows."""
    rows = []
    for point, c in cov.items():
        rows.append((point, 0, c["not_found"], ""))
        rows.append((point, 1, c["found"], "" if c["coverage_pct"] is None else f"{c['coverage_pct']:.1f}%"))
    return table(("obs_point", "heat_found", "count", "coverage"), rows)


def reasons_table(by_point: Mapping[str, Mapping[str, int]]) -> str:
    rows = [(point, reason, n) for point, counts in by_point.items() for reason, n in counts.items()]
    return table(("obs_point", "reason", "count"), rows)


def percentiles(values: list[int], points: Iterable[int] = (50, 90, 95, 99)) -> dict[str, int] | None:
    """Percentiles (interpolated between samples), max and n of the values; None when there are none."""
    if not values:
        return None
    cuts = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
    return {**{f"p{p}": round(cuts[p - 1]) for p in points}, "max": max(values), "n": len(values)}


def late_waits(entries: Iterable[Mapping[str, str]]) -> tuple[list[int], list[int]]:
    """wait_ms of the publish_plan_post hits and of its timeouts."""
    hits, timeouts = [], []
    for e in entries:
        if e.get("obs_point") != LATE_POINT or not e.get("wait_ms", "").isdigit():
            continue
        if e.get("heat_found") == "1":
            hits.append(int(e["wait_ms"]))
        elif e.get("heat_reason") == "timeout":
            timeouts.append(int(e["wait_ms"]))
    return hits, timeouts


def latency_rows(hits: list[int], timeouts: list[int]) -> list[tuple[Any, ...]]:
    rows = []
    for name, values in (("hit", hits), ("timeout", timeouts)):
        p = percentiles(values)
        rows.append((name, len(values), *((p[k] for k in ("p50", "p90", "p95", "p99", "max")) if p else ("-",) * 5)))
    return rows


def recommended_wait(p99_ms: float, poll_ms: int) -> int:
    """p99 of hits x 1.25, rounded up to a POLL_MS multiple, at least two polls."""
    return max(2 * poll_ms, math.ceil(p99_ms * 1.25 / poll_ms) * poll_ms)


def next_wait_step(wait_ms: int) -> int | None:
    """The runbook's next MAX_WAIT_MS step (2000 -> 3000 -> 4000), or None at or past the last one."""
    if wait_ms >= WAIT_LAST_STEP_MS:
        return None
    return (wait_ms // WAIT_STEP_MS + 1) * WAIT_STEP_MS


def raise_wait_text(wait_ms: int) -> str:
    step = next_wait_step(wait_ms)
    if step is None:
        return (f"P28_LATE_OBS_MAX_WAIT_MS={wait_ms} is at or past the runbook's last step ({WAIT_LAST_STEP_MS}): "
                "do not raise it further, look at HeatBridge's lag")
    return f"raise P28_LATE_OBS_MAX_WAIT_MS to {step} (the runbook's steps: 2000 -> 3000 -> 4000)"


def wait_advice(hits: Mapping[str, int] | None, settings: Settings) -> list[str]:
    """`latency`'s advice: headroom of the hits' p99 below MAX_WAIT_MS and a recommended value."""
    wait, poll = settings.late_obs_max_wait_ms, settings.late_obs_poll_ms
    if not hits:
        return ["no publish_plan_post hits yet: no latency data to tune MAX_WAIT_MS with"]
    p99 = hits["p99"]
    lines = [f"headroom: p99 of hits {p99} ms is {wait - p99} ms ({100 * (wait - p99) / wait:.1f}%) "
             f"below MAX_WAIT_MS={wait}",
             f"recommended P28_LATE_OBS_MAX_WAIT_MS={recommended_wait(p99, poll)} "
             f"(p99 of hits x 1.25, rounded up to POLL_MS={poll}, at least 2 x POLL_MS)"]
    if p99 >= wait - poll:
        lines.append(f"note: hits reach the deadline, so the real tail is cut off at MAX_WAIT_MS: "
                     f"{raise_wait_text(wait)}, only while drops are 0, and measure again")
    return lines


def histogram_rows(buckets: Iterable[tuple[str, float]], total: int) -> list[tuple[str, int, int, str]]:
    """Per bucket of a cumulative histogram (le in seconds as text, count): le_ms, hits, cumulative, cumulative%."""
    rows, below = [], 0.0
    for le, value in buckets:
        le_ms = "+Inf" if le == "+Inf" else str(round(float(le) * 1000))
        share = f"{100 * value / total:.1f}%" if total else "-"
        rows.append((le_ms, int(value - below), int(value), share))
        below = value
    return rows


# -- status -----------------------------------------------------------------------------


def config_rows(settings: Settings, sources: Mapping[str, str]) -> list[tuple[str, str, str]]:
    values = settings.as_env()
    if not values["CELERY_BROKER_URL"]:
        values["CELERY_BROKER_URL"] = f"(REDIS_URL) {values['REDIS_URL']}"
    return [(name, value, sources.get(name, "default")) for name, value in values.items()]


def wake_text(settings: Settings, healthy: bool) -> str:
    """The two wake settings and the interval the countdown chains use right now (as they decide it)."""
    env = settings.as_env()
    head = (f"P28_LATE_OBS_WAKE={env['P28_LATE_OBS_WAKE']}, P28_LATE_OBS_SAFETY_POLL_MS="
            f"{env['P28_LATE_OBS_SAFETY_POLL_MS']} (effective {settings.safety_poll_ms} ms)")
    if not settings.late_obs_wake:
        return f"{head}; off: chains poll every POLL_MS={settings.late_obs_poll_ms} ms"
    if healthy:
        return f"{head}; healthy: chains look every {settings.safety_poll_ms} ms, heat is recorded on push"
    return (f"{head}; degraded (no listener connected, or a live worker's listener is not): chains poll every "
            f"POLL_MS={settings.late_obs_poll_ms} ms")


def heartbeat_text(beats: list[dict[str, Any]]) -> str:
    if not beats:
        return f"heartbeats: none in {C.WORKERS}"

    def age(ms: int | None) -> str:
        return "-" if ms is None else f"{ms / 1000:.1f}s"

    rows = [(b["name"], "unreadable", "", "", "", "", "", "", b["unreadable"]) if "unreadable" in b else
            (b["name"], "ok" if b["fresh"] else "STALE", age(b["age_ms"]), b["wake"], age(b["last_push_age_ms"]),
             b["resyncs"], b.get("on") or "-", b.get("wake_on") or "-", f"{b['host']} pid {b['pid']}")
            for b in beats]
    fresh = sum(bool(b.get("fresh")) for b in beats)
    head = (f"heartbeats: {fresh} fresh of {len(beats)} in {C.WORKERS} "
            f"(ages by Redis TIME; stale after {WORKER_STALE_MS // 1000} s)")
    body = table(("worker", "state", "age", "wake", "last_push", "resyncs", "on", "wake_on", "process"), rows)
    return head + "\n" + "\n".join("  " + line for line in body.splitlines())


# -- verify -------------------------------------------------------------------------


def fmt(value: float | None) -> str:
    return "missing" if value is None else f"{value:g}"


def check(name: str, ok: bool, detail: str) -> dict[str, Any]:
    return {"name": name, "ok": ok, "detail": detail}


def verification(entries: list[dict[str, str]], samples: Samples | None, unreadable: str, metrics_url: str,
                 count: int, max_wait_ms: int) -> dict[str, Any]:
    """The post-deploy checks over the newest entries and one /metrics page.

    `samples` is None when the page could not be read; `unreadable` then says why (and what to do).
    """
    cov = coverage(entries)
    late = cov[LATE_POINT]
    late_reasons = reasons(entries)[LATE_POINT]
    checks = [check("publish_plan_post entries with hits", late["found"] > 0,
                    f"{late['total']} in the last {len(entries)} entries, {late['found']} with heat found")]
    values: dict[str, float | None] = {}
    if samples is None:
        checks += [check("timeout and redis_error series on /metrics", False, unreadable),
                   check("p28_late_obs_dropped_total on /metrics", False, unreadable)]
    else:
        for reason in ("timeout", "redis_error"):
            labels = frozenset({"obs_point": LATE_POINT, "reason": reason}.items())
            values[reason] = samples.get(("p28_heat_reason_total", labels))
        values["dropped"] = samples.get(("p28_late_obs_dropped_total", frozenset()))
        checks += [
            check("timeout and redis_error series on /metrics",
                  values["timeout"] is not None and values["redis_error"] is not None,
                  f"timeout={fmt(values['timeout'])} redis_error={fmt(values['redis_error'])}"),
            check("p28_late_obs_dropped_total on /metrics", values["dropped"] is not None,
                  f"p28_late_obs_dropped_total={fmt(values['dropped'])}"),
        ]
    recent_errors = late_reasons.get("redis_error", 0)
    checks.append(check("no redis_error in the recent entries", recent_errors == 0,
                        f"{recent_errors} of {late['total']} publish_plan_post entries"))
    return {"healthy": all(c["ok"] for c in checks), "checks": checks, "coverage": cov,
            "reasons": late_reasons, "metrics": {"url": metrics_url, **values}, "count": count,
            "advice": advice(late["total"], late_reasons.get("timeout", 0), values, max_wait_ms)}


def advice(late_total: int, timeouts: int, metrics: Mapping[str, float | None], max_wait_ms: int) -> list[str]:
    """The runbook's advice; it never changes verify's exit code."""
    out = []
    dropped = metrics.get("dropped") or 0
    if late_total and timeouts / late_total > TIMEOUT_RATE_LIMIT:
        # Raising MAX_WAIT_MS while plans are dropped keeps each lease longer and drops more.
        step = raise_wait_text(max_wait_ms) if not dropped else "fix the drops first"
        out.append(f"timeouts are {100 * timeouts / late_total:.0f}% of publish_plan_post (>50%): {step}, and "
                   f"check HeatBridge's lag (observer-tasks status)")
    if metrics.get("redis_error"):
        out.append(f"redis_error={fmt(metrics['redis_error'])}: an infrastructure problem, not tuning: check Redis "
                   "(redis-cli PING, INFO stats rejected_connections, CONFIG GET maxclients)")
    if dropped:
        out.append(f"dropped={fmt(dropped)}: saturation: raise P28_LATE_OBS_MAX_INFLIGHT first (e.g. 400), "
                   "then P28_LATE_OBS_MAX_WORKERS")
    return out
