"""observer-tasks: the operator's command line for the late heat observer.

Every command reads the same environment as the worker (REDIS_URL,
CELERY_BROKER_URL, P28_*) and fails with one line and exit code 1 when a value
is bad or Redis cannot be reached. The checks are the deployment checklist's
"never-lie" commands, done with redis-py and prometheus_client instead of
redis-cli, awk and curl.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shlex
import signal
import statistics
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import click
import redis
from prometheus_client.parser import text_string_to_metric_families

from . import keys as K
from .metrics import RedisCollector, serve
from .settings import Settings, SettingsError, redact_url
from .store import REDIS_DOWN, redis_client

#: Socket timeout of the command line's Redis connections (s).
CLI_TIMEOUT_S = 2.0
QUEUE = "late_obs"
HEAT_DECISIONS = "quantum:stream:harvest.heat.decision"
HEAT_BRIDGE_GROUP = "heat_bridge"
#: Above this share of timeouts the checklist says to raise MAX_WAIT_MS or look at HeatBridge.
TIMEOUT_RATE_LIMIT = 0.5
REDIS_ERRORS = (*REDIS_DOWN, redis.RedisError)


class Main(click.Group):
    """A Redis failure in the middle of any command ends it with one line, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except redis.RedisError as exc:
            raise click.ClickException(f"Redis: {exc}") from None


@click.group(cls=Main, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Operate the P2.8A.3 late heat observer (reads REDIS_URL, CELERY_BROKER_URL and P28_*).

    \b
    Examples:
      observer-tasks status --check      # configuration, in-flight plans, queue, workers
      observer-tasks verify              # the deployment checklist's three verifications
      observer-tasks coverage            # heat coverage per observation point
      observer-tasks latency             # publish -> heat latency and a MAX_WAIT_MS advice
      observer-tasks demo                # the whole pipeline on simulated plans for 20 s
    """


# -- shared helpers ------------------------------------------------------------


def load(environ: Mapping[str, str] | None = None) -> Settings:
    try:
        return Settings.from_env(environ)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


def connect(url: str, timeout: float = CLI_TIMEOUT_S) -> redis.Redis:
    """A fail-fast client that has answered PING, or one line and exit 1."""
    client = redis_client(url, timeout)
    try:
        client.ping()
    except REDIS_ERRORS as exc:
        raise click.ClickException(f"cannot reach Redis at {redact_url(url)}: {exc}") from None
    return client


def use_broker(settings: Settings) -> Any:
    """The Celery app, pointed at this environment's broker."""
    from .tasks import app

    if app.conf.broker_url != settings.broker:
        app.conf.broker_url = settings.broker
    return app


def broker_error(settings: Settings) -> str | None:
    """Why the broker cannot be reached, or None when it answers."""
    app = use_broker(settings)
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=CLI_TIMEOUT_S)
    except Exception as exc:  # kombu raises many types for a broker that is down
        return f"{exc}"
    return None


def late_obs_workers(settings: Settings, timeout: float = 1.0) -> list[str]:
    """Names of the workers that consume the late_obs queue (Celery's control API)."""
    replies = use_broker(settings).control.inspect(timeout=timeout).active_queues() or {}
    return sorted(name for name, queues in replies.items() if any(q.get("name") == QUEUE for q in queues or ()))


def recent(client: redis.Redis, settings: Settings, count: int) -> list[dict[str, str]]:
    """The newest `count` entries of the observed stream (XREVRANGE ... COUNT count), as text."""
    return [{k.decode(errors="replace"): v.decode(errors="replace") for k, v in fields.items()}
            for _id, fields in client.xrevrange(settings.obs_stream, count=count)]


def coverage(entries: Iterable[Mapping[str, str]]) -> dict[str, dict[str, Any]]:
    """Per observation point: heat found / not found, total and coverage %."""
    counts = Counter((e.get("obs_point"), e.get("heat_found")) for e in entries)
    out = {}
    for point in K.OBS_POINTS:
        found, missed = counts[(point, "1")], counts[(point, "0")]
        total = found + missed
        out[point] = {"found": found, "not_found": missed, "total": total,
                      "coverage_pct": round(100 * found / total, 1) if total else None}
    return out


def reasons(entries: Iterable[Mapping[str, str]]) -> dict[str, dict[str, int]]:
    counts = Counter((e.get("obs_point"), e.get("heat_reason")) for e in entries)
    return {point: {reason: counts[(point, reason)] for reason in K.REASONS if counts[(point, reason)]}
            for point in K.OBS_POINTS}


def coverage_table(cov: Mapping[str, Mapping[str, Any]]) -> str:
    """The checklist's Verification 1 table (obs_point heat_found count), with coverage on the hit rows."""
    rows = []
    for point, c in cov.items():
        rows.append((point, 0, c["not_found"], ""))
        rows.append((point, 1, c["found"], "" if c["coverage_pct"] is None else f"{c['coverage_pct']:.1f}%"))
    return table(("obs_point", "heat_found", "count", "coverage"), rows)


def reasons_table(by_point: Mapping[str, Mapping[str, int]]) -> str:
    rows = [(point, reason, n) for point, counts in by_point.items() for reason, n in counts.items()]
    return table(("obs_point", "reason", "count"), rows)


def table(headers: Iterable[Any], rows: Iterable[Iterable[Any]]) -> str:
    cells = [[str(c) for c in headers], *[["" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)


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
        if e.get("obs_point") != K.OBS_LATE or not e.get("wait_ms", "").isdigit():
            continue
        if e.get("heat_found") == "1":
            hits.append(int(e["wait_ms"]))
        elif e.get("heat_reason") == "timeout":
            timeouts.append(int(e["wait_ms"]))
    return hits, timeouts


def config_rows(settings: Settings, sources: Mapping[str, str]) -> list[tuple[str, str, str]]:
    values = settings.as_env()
    if not values["CELERY_BROKER_URL"]:
        values["CELERY_BROKER_URL"] = f"(REDIS_URL) {values['REDIS_URL']}"
    return [(name, value, sources.get(name, "default")) for name, value in values.items()]


# -- coverage, latency ------------------------------------------------------------

COUNT_HELP = "how many of the newest stream entries to read (XREVRANGE COUNT)"


@main.command("coverage")
@click.option("--count", default=600, show_default=True, type=click.IntRange(1), help=COUNT_HELP)
def coverage_cmd(count: int) -> None:
    """Heat coverage per observation point (the checklist's Verification 1).

    Counts obs_point and heat_found over the newest COUNT entries of the
    observed stream, like the checklist's redis-cli | awk pipeline, plus the
    coverage (share with heat found) of each point. Expected after deploy:
    publish_plan_post 50-90%, create_apply_plan low.

    \b
    Examples:
      observer-tasks coverage
      observer-tasks coverage --count 5000
      REDIS_URL=redis://10.0.0.5:6379/0 observer-tasks coverage
    """
    settings = load()
    entries = recent(connect(settings.redis_url), settings, count)
    click.echo(f"last {len(entries)} entries of {settings.obs_stream}")
    click.echo(coverage_table(coverage(entries)))


@main.command()
@click.option("--count", default=2000, show_default=True, type=click.IntRange(1), help=COUNT_HELP)
def latency(count: int) -> None:
    """Publish -> observation latency of the late observer, and a MAX_WAIT_MS advice.

    Reads wait_ms of the publish_plan_post entries among the newest COUNT
    stream entries: percentiles of the hits (heat found) and of the timeouts,
    the headroom of the hits' p99 below P28_LATE_OBS_MAX_WAIT_MS, a recommended
    MAX_WAIT_MS (p99 of hits x 1.25, rounded up to a POLL_MS multiple, at least
    2 x POLL_MS), and the all-time heat-wait histogram the workers keep in Redis
    (the p28_late_obs_heat_wait_seconds family of /metrics).

    \b
    Examples:
      observer-tasks latency
      observer-tasks latency --count 10000
    """
    settings = load()
    client = connect(settings.redis_url)
    entries = recent(client, settings, count)
    hits, timeouts = late_waits(entries)
    wait, poll = settings.late_obs_max_wait_ms, settings.late_obs_poll_ms
    click.echo(f"publish_plan_post wait_ms (last {len(entries)} entries of {settings.obs_stream}; "
               f"MAX_WAIT_MS={wait}, POLL_MS={poll})")
    rows = []
    for name, values in (("hit", hits), ("timeout", timeouts)):
        p = percentiles(values)
        rows.append((name, len(values), *((p[k] for k in ("p50", "p90", "p95", "p99", "max")) if p else ("-",) * 5)))
    click.echo(table(("outcome", "n", "p50", "p90", "p95", "p99", "max"), rows))
    click.echo("")
    for line in wait_advice(percentiles(hits), settings):
        click.echo(line)
    click.echo("")
    click.echo(histogram_text(settings, client))


def recommended_wait(p99_ms: float, poll_ms: int) -> int:
    return max(2 * poll_ms, math.ceil(p99_ms * 1.25 / poll_ms) * poll_ms)


def wait_advice(hits: dict[str, int] | None, settings: Settings) -> list[str]:
    wait, poll = settings.late_obs_max_wait_ms, settings.late_obs_poll_ms
    if not hits:
        return ["no publish_plan_post hits yet: no latency data to tune MAX_WAIT_MS with"]
    p99 = hits["p99"]
    lines = [f"headroom: p99 of hits {p99} ms is {wait - p99} ms ({100 * (wait - p99) / wait:.1f}%) "
             f"below MAX_WAIT_MS={wait}",
             f"recommended P28_LATE_OBS_MAX_WAIT_MS={recommended_wait(p99, poll)} "
             f"(p99 of hits x 1.25, rounded up to POLL_MS={poll}, at least 2 x POLL_MS)"]
    if p99 >= wait - poll:
        lines.append("note: hits reach the deadline, so the real tail is cut off at MAX_WAIT_MS; raise it a step "
                     "(2000 -> 3000 -> 4000, only while drops are 0) and measure again")
    return lines


def histogram_text(settings: Settings, client: redis.Redis) -> str:
    """The heat-wait histogram as /metrics shows it (cumulative buckets), per bucket and cumulative."""
    raw = {k.decode(): v.decode() for k, v in client.hgetall(K.HEAT_WAIT).items()}
    family = RedisCollector(settings, client).histogram(raw)
    total = int(raw.get("count", 0))
    mean = f", mean {1000 * float(raw.get('sum', 0)) / total:.0f} ms" if total else ""
    rows, below = [], 0.0
    for s in family.samples:
        if s.name.endswith("_bucket"):
            le = "+Inf" if s.labels["le"] == "+Inf" else str(round(float(s.labels["le"]) * 1000))
            share = f"{100 * s.value / total:.1f}%" if total else "-"
            rows.append((le, int(s.value - below), int(s.value), share))
            below = s.value
    head = f"heat-wait histogram ({K.HEAT_WAIT}, all time: {total} hits{mean})"
    return head + "\n" + table(("le_ms", "hits", "cumulative", "cumulative%"), rows)


# -- verify -------------------------------------------------------------------------


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The samples of a /metrics page; OSError or ValueError when it cannot be read."""
    with urllib.request.urlopen(url, timeout=CLI_TIMEOUT_S) as resp:
        text = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def check(name: str, ok: bool, detail: str) -> dict[str, Any]:
    return {"name": name, "ok": ok, "detail": detail}


@main.command()
@click.option("--count", default=600, show_default=True, type=click.IntRange(1), help=COUNT_HELP)
@click.option("--metrics-url", default="http://localhost:8043/metrics", show_default=True,
              help="the worker's (or exporter's) /metrics")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of text")
def verify(count: int, metrics_url: str, as_json: bool) -> None:
    """The checklist's three post-deploy verifications as one command.

    \b
    1. publish_plan_post entries with heat_found=1 among the newest COUNT entries
    2. p28_heat_reason_total{obs_point="publish_plan_post"} timeout and redis_error
       series on /metrics
    3. p28_late_obs_dropped_total on /metrics
    and no redis_error among the newest COUNT entries (infrastructure trouble now).

    Prints the coverage per obs_point and the checklist's advice (timeouts
    above 50%, redis_error > 0, drops > 0); advice does not change the exit code.
    Exit 0 when healthy, 1 otherwise, including when /metrics cannot be read
    (that is how a stopped worker shows).

    \b
    Examples:
      observer-tasks verify
      observer-tasks verify --metrics-url http://apply-host:8043/metrics --json | jq .healthy
    """
    settings = load()
    entries = recent(connect(settings.redis_url), settings, count)
    report = verification(entries, metrics_url, count)
    if as_json:
        click.echo(json.dumps(report))
    else:
        for c in report["checks"]:
            click.echo(f"{'OK  ' if c['ok'] else 'FAIL'}  {c['name']}: {c['detail']}")
        click.echo(f"\ncoverage (last {len(entries)} entries)")
        click.echo(coverage_table(report["coverage"]))
        for line in report["advice"]:
            click.echo(f"advice: {line}")
        click.echo("\nhealthy" if report["healthy"] else "\nUNHEALTHY")
    if not report["healthy"]:
        raise SystemExit(1)


def verification(entries: list[dict[str, str]], metrics_url: str, count: int) -> dict[str, Any]:
    cov = coverage(entries)
    late = cov[K.OBS_LATE]
    late_reasons = reasons(entries)[K.OBS_LATE]
    checks = [check("publish_plan_post entries with hits", late["found"] > 0,
                    f"{late['total']} in the last {len(entries)} entries, {late['found']} with heat found")]
    values: dict[str, float | None] = {}
    try:
        samples = scrape(metrics_url)
    except (OSError, ValueError) as exc:
        reason = f"cannot read {metrics_url} ({exc}): worker stopped, or metrics disabled?"
        checks += [check("timeout and redis_error series on /metrics", False, reason),
                   check("p28_late_obs_dropped_total on /metrics", False, reason)]
    else:
        for reason in ("timeout", "redis_error"):
            labels = frozenset({"obs_point": K.OBS_LATE, "reason": reason}.items())
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
            "advice": advice(late["total"], late_reasons.get("timeout", 0), values)}


def fmt(value: float | None) -> str:
    return "missing" if value is None else f"{value:g}"


def advice(late_total: int, timeouts: int, metrics: Mapping[str, float | None]) -> list[str]:
    out = []
    dropped = metrics.get("dropped") or 0
    if late_total and timeouts / late_total > TIMEOUT_RATE_LIMIT:
        step = "raise P28_LATE_OBS_MAX_WAIT_MS (3000-5000)" if not dropped else "fix the drops first"
        out.append(f"timeouts are {100 * timeouts / late_total:.0f}% of publish_plan_post (>50%): {step}, and "
                   f"check HeatBridge's lag (observer-tasks status)")
    if metrics.get("redis_error"):
        out.append(f"redis_error={fmt(metrics['redis_error'])}: an infrastructure problem, not tuning: check Redis "
                   "(redis-cli PING, INFO stats rejected_connections, CONFIG GET maxclients)")
    if dropped:
        out.append(f"dropped={fmt(dropped)}: saturation: raise P28_LATE_OBS_MAX_INFLIGHT first (e.g. 400), "
                   "then P28_LATE_OBS_MAX_WORKERS")
    return out


# -- status -------------------------------------------------------------------------


@main.command()
@click.option("--check", "strict", is_flag=True,
              help="exit 1 when Redis or the broker is unreachable or no worker consumes late_obs")
def status(strict: bool) -> None:
    """The effective configuration and the observer's state right now.

    Shows every variable with its value and source (env or default; passwords
    hidden), plans in flight against MAX_INFLIGHT, the late_obs queue length on
    the broker, the workers consuming late_obs, and HeatBridge's consumer-group
    lag on quantum:stream:harvest.heat.decision.

    \b
    Examples:
      observer-tasks status
      observer-tasks status --check && echo ready     # for health checks and scripts
    """
    settings = load()
    client = connect(settings.redis_url)
    click.echo("configuration")
    click.echo(table(("variable", "value", "source"), config_rows(settings, Settings.sources())))
    click.echo("")
    problems = []
    now_ms = int(time.time() * 1000)
    pipe = client.pipeline(transaction=False)
    pipe.zcard(K.INFLIGHT)
    pipe.zcount(K.INFLIGHT, f"({now_ms}", "+inf")
    leases, active = pipe.execute()
    click.echo(f"redis:      {redact_url(settings.redis_url)} answers")
    click.echo(f"in flight:  {active} of P28_LATE_OBS_MAX_INFLIGHT={settings.late_obs_max_inflight}"
               + (f" ({leases - active} more past their lease, waiting for the sweeper)" if leases > active else ""))
    error = broker_error(settings)
    if error:
        problems.append("broker unreachable")
        click.echo(f"broker:     {redact_url(settings.broker)} UNREACHABLE: {error}")
        click.echo("workers:    unknown (broker unreachable)")
    else:
        click.echo(f"broker:     {redact_url(settings.broker)} answers, {QUEUE} queue length {queue_length(settings)}")
        workers = late_obs_workers(settings)
        if not workers:
            problems.append(f"no worker consumes {QUEUE}")
        click.echo(f"workers:    {len(workers)} consuming {QUEUE}" + (f": {', '.join(workers)}" if workers else ""))
    click.echo(f"heatbridge: {heat_bridge_lag(client)}")
    if strict and problems:
        raise click.ClickException("status check failed: " + "; ".join(problems))


def queue_length(settings: Settings) -> str:
    if not settings.broker.startswith(("redis://", "rediss://", "unix://")):
        return "n/a (not a Redis broker)"
    return str(connect(settings.broker).llen(QUEUE))


def heat_bridge_lag(client: redis.Redis) -> str:
    if not client.exists(HEAT_DECISIONS):
        return f"{HEAT_DECISIONS} does not exist on this Redis"
    for group in client.xinfo_groups(HEAT_DECISIONS):
        name = group["name"].decode() if isinstance(group["name"], bytes) else group["name"]
        if name == HEAT_BRIDGE_GROUP:
            return (f"group {HEAT_BRIDGE_GROUP} on {HEAT_DECISIONS}: lag {group.get('lag')}, "
                    f"pending {group.get('pending')}")
    return f"no consumer group {HEAT_BRIDGE_GROUP} on {HEAT_DECISIONS}"


# -- metrics --------------------------------------------------------------------------


@main.command()
@click.option("--port", type=click.IntRange(1, 65535), help="port to serve on [default: P28_METRICS_PORT, 8043]")
@click.option("--addr", help="address to bind [default: P28_METRICS_ADDR, 0.0.0.0]")
def metrics(port: int | None, addr: str | None) -> None:
    """Serve /metrics from Redis without a worker (the standalone exporter).

    The counters live in Redis, so this page shows the same totals as any
    worker's. Runs until SIGINT or SIGTERM.

    \b
    Examples:
      observer-tasks metrics
      observer-tasks metrics --port 9043 --addr 127.0.0.1
      curl -s localhost:9043/metrics | grep p28_late_obs_dropped_total
    """
    settings = load()
    if addr:
        settings = dataclasses.replace(settings, metrics_addr=addr)
    port = port or settings.metrics_port
    if not port:
        raise click.ClickException("P28_METRICS_PORT=0 disables metrics: pass --port")
    client = connect(settings.redis_url)
    try:
        server, _thread = serve(settings, client, port)
    except OSError as exc:
        raise click.ClickException(f"cannot serve on {settings.metrics_addr}:{port}: {exc}") from None
    click.echo(f"serving http://{settings.metrics_addr}:{port}/metrics from {redact_url(settings.redis_url)}",
               err=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1):
        pass
    server.shutdown()


# -- config check -----------------------------------------------------------------------


@main.group()
def config() -> None:
    """Check configuration before deploying it."""


@config.command("check")
@click.option("--env-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="KEY=VALUE file (comments, quotes and `export ` allowed) [default: the environment]")
def config_check(env_file: Path | None) -> None:
    """Validate settings the way the worker will, and show the effective values.

    Exit 1 with one line naming the variable and the value when a value would
    be refused at start-up. Unknown P28_* names (typos) are warned about.

    \b
    Examples:
      observer-tasks config check --env-file /etc/quantum/apply-layer.env
      observer-tasks config check          # the current environment
    """
    values, origin = read_env_file(env_file) if env_file else (dict(os.environ), {})
    try:
        settings = Settings.from_env(values)
    except SettingsError as exc:
        raise click.ClickException(f"{env_file or 'environment'}: {exc}") from None
    sources = {name: (f"{env_file}:{origin[name]}" if name in origin else source)
               for name, source in Settings.sources(values).items()}
    click.echo(table(("variable", "value", "source"), config_rows(settings, sources)))
    for name in sorted(set(values) - set(sources)):
        if name.startswith("P28_"):
            click.echo(f"warning: {name} is not a setting of the observer (typo?); it is ignored", err=True)


def read_env_file(path: Path) -> tuple[dict[str, str], dict[str, int]]:
    """The file's variables and the line of each.

    KEY=VALUE lines, optionally after `export `; blank lines and lines starting with # are skipped. A value
    may be quoted ('...' or "...", shell rules); an unquoted one ends at whitespace followed by # (a comment).
    """
    values, lines = {}, {}
    for number, text in enumerate(path.read_text().splitlines(), 1):
        line = text.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").lstrip()
        name, eq, raw = line.partition("=")
        raw = raw.strip()
        quoted = raw[:1] in ("'", '"')
        try:
            words = shlex.split(raw, comments=True) if quoted else [re.split(r"\s+#", raw)[0]]
        except ValueError as exc:
            raise click.ClickException(f"{path}:{number}: {exc}") from None
        if not eq or not name.isidentifier() or len(words) != 1 or (not quoted and re.search(r"\s", words[0])):
            raise click.ClickException(f"{path}:{number}: expected KEY=VALUE, got {text.strip()[:80]!r}")
        values[name], lines[name] = words[0], number
    return values, lines


# -- demo ---------------------------------------------------------------------------------


@main.command()
@click.option("--seconds", default=20.0, show_default=True, type=click.FloatRange(0.1, 86_400),
              help="how long to publish plans")
@click.option("--rate", default=10.0, show_default=True, type=click.FloatRange(0.1, 10_000),
              help="plans per second")
@click.option("--heat-median-ms", default=400.0, show_default=True, type=click.FloatRange(1, 600_000),
              help="median delay of HeatBridge's heat hash after publish (lognormal)")
@click.option("--never-share", default=0.3, show_default=True, type=click.FloatRange(0, 1),
              help="share of plans that never get heat")
@click.option("--seed", type=int, help="random seed, for a repeatable run")
@click.option("--no-worker", is_flag=True, help="do not start a worker when none consumes late_obs")
@click.option("--json", "as_json", is_flag=True, help="progress to stderr, one JSON object to stdout")
def demo(**options: Any) -> None:
    """Run the whole pipeline on simulated plans for a bounded time, then report.

    A simulated apply layer publishes plans (XADD quantum:stream:apply.plan,
    observe(), observe_late()), a simulated HeatBridge writes their heat hashes
    after a lognormal delay (a share never gets heat), and a worker (started
    here unless one already consumes late_obs) observes them. Prints one
    progress line per second, waits for the plans in flight, and ends with the
    coverage per observation point, reasons, drops and latency. Only this run's
    plans (ids demo-<run>-<n>) are counted.

    It writes to the stream and counters at REDIS_URL: do not point it at a
    production Redis. With no Redis at REDIS_URL it starts a private
    redis-server (from PATH) for the run.

    \b
    Examples:
      observer-tasks demo
      observer-tasks demo --seconds 60 --rate 50 --heat-median-ms 900 --never-share 0.1
      P28_LATE_OBS_MAX_WAIT_MS=3000 observer-tasks demo --seed 7 --json
    """
    from .demo import run

    raise SystemExit(run(**options))


if __name__ == "__main__":
    main()
