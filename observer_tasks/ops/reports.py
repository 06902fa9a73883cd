"""Report arithmetic and tables of the operator tools: coverage, reasons, percentiles, histograms, status's text.

Pure functions over stream entries (dicts of text fields) and scraped /metrics
samples: no Redis, no broker, no click. The commands and the demo all import
them, so the demo's closing table and ``observer-tasks coverage`` cannot drift
apart.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from ..core import contract as C
from ..core.settings import LATE_POINT, Settings
from ..core.timings import WORKER_STALE_MS
from ..core.urls import redact_url

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
    """Verification 1's table (obs_point heat_found count), with the coverage on the hit rows; plans a window
    saw dropped or refused (``Window.coverage``) on rows of their own: they count against the coverage."""
    rows: list[tuple[Any, ...]] = []
    for point, c in cov.items():
        rows.append((point, 0, c["not_found"], ""))
        rows.append((point, 1, c["found"], "" if c["coverage_pct"] is None else f"{c['coverage_pct']:.1f}%"))
        rows += [(point, kind, c[kind], "not observed") for kind in ("dropped", "refused") if c.get(kind)]
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
    for name in settings.broker_choices():
        values[name] = values[name] or "(not set)"
    return [(name, value, sources.get(name, "default")) for name, value in values.items()]


def broker_text(settings: Settings) -> str:
    """The broker in use and which variable gave it (the first set of them, in their order of precedence)."""
    order = ", else ".join(settings.broker_choices())
    return f"{redact_url(settings.broker)} (from {settings.broker_source}; precedence: {order})"


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
