"""`observer-tasks verify`: the checklist's post-deploy verifications as one command, true at any moment.

Besides the checklist's three (late hits in the stream, the timeout and redis_error series and the dropped
counter on /metrics) and no redis_error among the newest entries, it watches the counters for a window
(window.py): a plan dropped or a call refused in it fails verify, its coverage counts those plans as not
observed, and its advice reads the window's rates, never the lifetime counters (a saturation that has ended
does not advise raising MAX_INFLIGHT for ever).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import click

from ..core.settings import LATE_POINT
from . import limits as L
from . import probes as P
from .latency import raise_wait_text
from .reports import Samples, coverage, coverage_table, reasons
from .window import Snapshot, Window, gap_ended_within, measure, refusals_text

#: Above this share of timeouts the runbook says to raise MAX_WAIT_MS or look at HeatBridge.
TIMEOUT_RATE_LIMIT = 0.5
#: Drops within this long after a Redis gap ended are the apply layers' replayed calls, not saturation (ms).
REPLAY_MS = 60_000
#: What each refusal cause means, and what to do.
REFUSAL_ADVICE = {
    "unavailable": "Redis or the broker did not answer the apply layer: infrastructure, not tuning (observer-tasks "
                   "status; redis-cli PING)",
    "given_up": "calls held through a long Redis or broker outage were given up: infrastructure, not tuning "
                "(observer-tasks status)",
    "backlog": "plans wait past their lease with no worker deciding them: every worker down or far behind "
               "(observer-tasks status: workers, heartbeats, backlog); nothing to tune",
    "config_error": "Redis refuses the apply layer's user: fix the password in REDIS_URL or the user's ACL "
                    "(observer-tasks config check --env-file ...)",
    "invalid_input": "the apply layer passes invalid arguments (plan id, symbol, decision or observation point): a "
                     "bug in its call; its journal names them",
}


def fmt(value: float | None) -> str:
    return "missing" if value is None else f"{value:g}"


def check(name: str, ok: bool, detail: str) -> dict[str, Any]:
    return {"name": name, "ok": ok, "detail": detail}


def verification(entries: list[dict[str, str]], samples: Samples | None, unreadable: str, metrics_url: str,
                 count: int, window: Window, points: tuple[str, ...], max_wait_ms: int, max_inflight: int,
                 after_gap: bool = False) -> dict[str, Any]:
    """The checks over the newest entries, one /metrics page and the window.

    `samples` is None when the page could not be read; `unreadable` then says why (and what to do).
    ``after_gap``: a Redis gap ended within REPLAY_MS of the window's end.
    """
    late = coverage(entries, points)[LATE_POINT]
    late_reasons = reasons(entries, points)[LATE_POINT]
    seconds = f"{window.seconds:.0f} s"
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
    dropped, refused = window.dropped, window.refused
    checks += [
        check("no plans dropped in the window", dropped == 0,
              f"{dropped} in the last {seconds}" + (f" ({window.rate(dropped):.1f}/s)" if dropped else "")
              + f"; p28_late_obs_dropped_total {window.lifetime('p28_late_obs_dropped')} all time"),
        check("no calls refused in the window", not refused,
              f"{sum(refused.values())} in the last {seconds}" + (f": {refusals_text(refused)}" if refused else "")
              + f"; p28_observe_refused_total {window.lifetime('p28_observe_refused')} all time"),
    ]
    # Coverage: the window's plans (dropped and refused ones count as not observed) when it saw any; at quiet
    # times the newest entries, as the checklist's Verification 1 counts them.
    in_window = window.plans(points) > 0
    cov = window.coverage(points) if in_window else coverage(entries, points)
    basis = (f"the last {seconds}: plans recorded, dropped and refused" if in_window
             else f"last {len(entries)} entries; no plan in the last {seconds}")
    window_reasons = window.late_reasons()
    late_total, timeouts = ((sum(window_reasons.values()), window_reasons.get("timeout", 0)) if window_reasons
                            else (late["total"], late_reasons.get("timeout", 0)))
    return {"healthy": all(c["ok"] for c in checks), "checks": checks, "coverage": cov, "coverage_of": basis,
            "reasons": late_reasons, "metrics": {"url": metrics_url, **values}, "count": count,
            "window": {"seconds": round(window.seconds, 3), "dropped": dropped,
                       "refused": {f"{point}:{cause}": n for (point, cause), n in refused.items()},
                       "reasons": window_reasons, "redis_gaps": window.total("p28_late_obs_redis_gaps")},
            "advice": advice(late_total, timeouts, recent_errors, window, max_wait_ms, max_inflight, after_gap)}


def advice(late_total: int, timeouts: int, recent_errors: int, window: Window, max_wait_ms: int,
           max_inflight: int, after_gap: bool = False) -> list[str]:
    """The runbook's advice from what is happening now (the window, else the newest entries); it never changes
    verify's exit code."""
    out = []
    seconds, dropped = f"{window.seconds:.0f} s", window.dropped
    if late_total and timeouts / late_total > TIMEOUT_RATE_LIMIT:
        # Raising MAX_WAIT_MS while plans are dropped keeps each lease longer and drops more.
        step = raise_wait_text(max_wait_ms) if not dropped else "fix the drops first"
        out.append(f"timeouts are {100 * timeouts / late_total:.0f}% of publish_plan_post (>50%): {step}, and "
                   f"check HeatBridge's lag (observer-tasks status)")
    window_errors = window.late_reasons().get("redis_error", 0)
    if recent_errors or window_errors:
        out.append(f"redis_error in {recent_errors} of the recent entries ({window_errors} in the last {seconds}): "
                   "an infrastructure problem, not tuning: check Redis (redis-cli PING, INFO errorstats, "
                   "INFO stats rejected_connections, CONFIG GET maxclients)")
    if dropped and (after_gap or window.total("p28_late_obs_redis_gaps")):
        out.append(f"dropped {dropped} in the last {seconds} right after a Redis gap: the apply layers replay the "
                   "calls they held through it in a burst: not saturation; run verify again in a minute")
    elif dropped:
        out.append(f"dropped {dropped} in the last {seconds} ({window.rate(dropped):.1f}/s): saturation "
                   f"({max_inflight} live leases): raise P28_LATE_OBS_MAX_INFLIGHT first (e.g. {2 * max_inflight}), "
                   "then P28_LATE_OBS_MAX_WORKERS")
    causes: dict[str, int] = {}
    for (_point, cause), n in window.refused.items():
        causes[cause] = causes.get(cause, 0) + n
    out += [f"refused {n} calls in the last {seconds} ({cause}): {REFUSAL_ADVICE.get(cause, 'see the runbook')}"
            for cause, n in sorted(causes.items(), key=lambda kv: -kv[1])]
    return out


@click.command()
@click.option("--count", default=600, show_default=True, type=click.IntRange(1),
              help="how many of the newest stream entries to read (XREVRANGE COUNT)")
@click.option("--window", "window_s", default=10.0, show_default=True, type=click.FloatRange(1, 600),
              help="how long to watch the counters for drops and refusals (s): verify takes this long")
@click.option("--metrics-url",
              help="the /metrics of a worker or of `observer-tasks metrics` [default: this host's, "
                   "http://127.0.0.1:P28_METRICS_PORT/metrics (P28_METRICS_ADDR's address unless it is 0.0.0.0), "
                   f"or port {P.EXPORTER_PORT}, the exporter's, when P28_METRICS_PORT=0]")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of text")
def verify(count: int, window_s: float, metrics_url: str | None, as_json: bool) -> None:
    """The post-deploy verifications as one command; it takes --window seconds (10).

    \b
    1. publish_plan_post entries with heat_found=1 among the newest COUNT entries
    2. p28_heat_reason_total{obs_point="publish_plan_post"} timeout and redis_error
       series on /metrics
    3. p28_late_obs_dropped_total on /metrics
    4. no redis_error among the newest COUNT entries (infrastructure trouble now)
    5. no plan dropped (p28_late_obs_dropped_total) and 6. no call refused
       (p28_observe_refused_total, any cause) in the window: the counters read
       twice, --window seconds apart

    /metrics is read from this host's port (P28_METRICS_PORT, the same env
    file as the workers'); with P28_METRICS_PORT=0 from the standalone
    exporter's default port (observer-tasks metrics); --metrics-url wins.
    Prints the coverage per obs_point (of the window's plans, dropped and
    refused ones counted as not observed, when it saw any; else of the newest
    entries) and the runbook's advice from the window's rates (drops, refusals
    by cause, timeouts above 50%, redis_error); advice does not change the exit
    code. Exit 0 when healthy, 1 otherwise (the failed checks named), including
    when /metrics cannot be read (that is how a stopped worker shows).

    \b
    Examples:
      observer-tasks verify
      observer-tasks verify --window 60        # a longer look at drops and refusals
      observer-tasks verify --metrics-url http://apply-host:8043/metrics --json | jq .healthy
    """
    settings = P.load()
    client = P.connect(settings.redis_url, settings)
    url = metrics_url or P.local_metrics_url(settings)

    def meanwhile(_before: Snapshot) -> tuple[list[dict[str, str]], Samples | None, str, list[L.Process]]:
        entries, samples, unreadable = P.recent(client, settings, count), None, ""
        try:
            samples = P.scrape(url)
        except (OSError, ValueError) as exc:
            unreadable = f"cannot read {url} ({exc}): {P.why_unreadable(settings, explicit=metrics_url is not None)}"
        return entries, samples, unreadable, L.running(client)

    window, (entries, samples, unreadable, processes) = measure(client, settings, window_s, meanwhile)
    max_wait, _ = L.in_force(processes, "max_wait_ms", settings.late_obs_max_wait_ms)
    max_inflight, _ = L.in_force(processes, "max_inflight", settings.late_obs_max_inflight)
    after_gap = gap_ended_within(client, window.after.now_ms, REPLAY_MS)
    report = verification(entries, samples, unreadable, url, count, window, settings.obs_points, max_wait,
                          max_inflight, after_gap)
    if as_json:
        click.echo(json.dumps(report))
    else:
        print_text(report)
    if not report["healthy"]:
        raise SystemExit(1)


def print_text(report: Mapping[str, Any]) -> None:
    for c in report["checks"]:
        click.echo(f"{'OK  ' if c['ok'] else 'FAIL'}  {c['name']}: {c['detail']}")
    click.echo(f"\ncoverage ({report['coverage_of']})")
    click.echo(coverage_table(report["coverage"]))
    for line in report["advice"]:
        click.echo(f"advice: {line}")
    click.echo("\nhealthy" if report["healthy"] else "\nUNHEALTHY")
