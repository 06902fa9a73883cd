"""observer-tasks: the operator's command line for the late heat observer (click wiring only).

Every command reads the same environment as the worker (REDIS_URL,
CELERY_BROKER_URL, P28_*). Exit codes: 2 and one line when the configuration
is refused (as the worker refuses it), 1 and one line when Redis or the broker
cannot be reached or a check fails. The arithmetic lives in ``reports``, the
questions to Redis, the broker and /metrics in ``probes``, env-file reading in
``envfile``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import click
import redis

from ..core import contract as C
from ..core.access import access_problem
from ..core.connections import master_address
from ..core.messages import QUEUE
from ..core.settings import Settings, SettingsError
from ..core.urls import redact_url
from . import demo as demo_run
from . import envfile
from . import probes as P
from . import reports as R

COUNT_HELP = "how many of the newest stream entries to read (XREVRANGE COUNT)"


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

    Exit codes: 0 ok, 1 a check failed or Redis/the broker cannot be reached,
    2 the configuration is refused (as the worker would refuse it).

    \b
    Examples:
      observer-tasks status --check      # configuration, in-flight plans, queue, workers
      observer-tasks verify              # the post-deploy verifications
      observer-tasks coverage            # heat coverage per observation point
      observer-tasks latency             # publish -> heat latency and a MAX_WAIT_MS advice
      observer-tasks demo                # the whole pipeline on simulated plans for 20 s
    """


# -- coverage, latency ------------------------------------------------------------


@main.command("coverage")
@click.option("--count", default=600, show_default=True, type=click.IntRange(1), help=COUNT_HELP)
def coverage_cmd(count: int) -> None:
    """Heat coverage per observation point (Verification 1).

    Counts obs_point and heat_found over the newest COUNT entries of the
    observed stream, like the runbook's redis-cli | awk pipeline, plus the
    coverage (share with heat found) of each point. Expected after deploy:
    publish_plan_post 50-90%, create_apply_plan low.

    \b
    Examples:
      observer-tasks coverage
      observer-tasks coverage --count 5000
      REDIS_URL=redis://10.0.0.5:6379/0 observer-tasks coverage
    """
    settings = P.load()
    entries = P.recent(P.connect(settings.redis_url, settings), settings, count)
    click.echo(f"last {len(entries)} entries of {settings.obs_stream}")
    click.echo(R.coverage_table(R.coverage(entries)))


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
    settings = P.load()
    client = P.connect(settings.redis_url, settings)
    entries = P.recent(client, settings, count)
    hits, timeouts = R.late_waits(entries)
    click.echo(f"publish_plan_post wait_ms (last {len(entries)} entries of {settings.obs_stream}; "
               f"MAX_WAIT_MS={settings.late_obs_max_wait_ms}, POLL_MS={settings.late_obs_poll_ms})")
    click.echo(R.table(("outcome", "n", "p50", "p90", "p95", "p99", "max"), R.latency_rows(hits, timeouts)))
    click.echo("")
    for line in R.wait_advice(R.percentiles(hits), settings):
        click.echo(line)
    click.echo("")
    buckets, total, seconds = P.heat_wait_histogram(settings, client)
    mean = f", mean {1000 * seconds / total:.0f} ms" if total else ""
    click.echo(f"heat-wait histogram ({C.COUNTERS}, all time: {total} hits{mean})")
    click.echo(R.table(("le_ms", "hits", "cumulative", "cumulative%"), R.histogram_rows(buckets, total)))


# -- verify -------------------------------------------------------------------------


@main.command()
@click.option("--count", default=600, show_default=True, type=click.IntRange(1), help=COUNT_HELP)
@click.option("--metrics-url",
              help="the /metrics of a worker or of `observer-tasks metrics` [default: this host's, "
                   "http://127.0.0.1:P28_METRICS_PORT/metrics (P28_METRICS_ADDR's address unless it is 0.0.0.0), "
                   f"or port {P.EXPORTER_PORT}, the exporter's, when P28_METRICS_PORT=0]")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of text")
def verify(count: int, metrics_url: str | None, as_json: bool) -> None:
    """The post-deploy verifications as one command.

    \b
    1. publish_plan_post entries with heat_found=1 among the newest COUNT entries
    2. p28_heat_reason_total{obs_point="publish_plan_post"} timeout and redis_error
       series on /metrics
    3. p28_late_obs_dropped_total on /metrics
    4. no redis_error among the newest COUNT entries (infrastructure trouble now)

    /metrics is read from this host's port (P28_METRICS_PORT, the same env
    file as the workers'); with P28_METRICS_PORT=0 from the standalone
    exporter's default port (observer-tasks metrics); --metrics-url wins.
    Prints the coverage per obs_point and the runbook's advice (timeouts
    above 50%, redis_error > 0, drops > 0); advice does not change the exit
    code. Exit 0 when healthy, 1 otherwise, including when /metrics cannot be
    read (that is how a stopped worker shows).

    \b
    Examples:
      observer-tasks verify
      observer-tasks verify --metrics-url http://apply-host:8043/metrics --json | jq .healthy
    """
    settings = P.load()
    entries = P.recent(P.connect(settings.redis_url, settings), settings, count)
    url = metrics_url or P.local_metrics_url(settings)
    samples, unreadable = None, ""
    try:
        samples = P.scrape(url)
    except (OSError, ValueError) as exc:
        unreadable = f"cannot read {url} ({exc}): {P.why_unreadable(settings, explicit=metrics_url is not None)}"
    report = R.verification(entries, samples, unreadable, url, count, settings.late_obs_max_wait_ms)
    if as_json:
        click.echo(json.dumps(report))
    else:
        for c in report["checks"]:
            click.echo(f"{'OK  ' if c['ok'] else 'FAIL'}  {c['name']}: {c['detail']}")
        click.echo(f"\ncoverage (last {len(entries)} entries)")
        click.echo(R.coverage_table(report["coverage"]))
        for line in report["advice"]:
            click.echo(f"advice: {line}")
        click.echo("\nhealthy" if report["healthy"] else "\nUNHEALTHY")
    if not report["healthy"]:
        raise SystemExit(1)


# -- status -------------------------------------------------------------------------


@main.command()
@click.option("--check", "strict", is_flag=True,
              help="exit 1 when Redis or the broker is unreachable or no worker consumes late_obs")
def status(strict: bool) -> None:
    """The effective configuration and the observer's state right now.

    Shows every variable with its value and source (env or default; passwords
    hidden), plans in flight against MAX_INFLIGHT, the late_obs messages on the
    broker (ready ones, and the ones parked for their countdown: kombu's
    unacked hash on Redis, unacknowledged messages on RabbitMQ, read with
    rabbitmqctl when it runs on this host), the workers consuming late_obs,
    each worker's heartbeat (age, wake listener, last push, resyncs) and
    HeatBridge's consumer-group lag on quantum:stream:harvest.heat.decision.

    \b
    Examples:
      observer-tasks status
      observer-tasks status --check && echo ready     # for health checks and scripts
    """
    settings = P.load()
    client = P.connect(settings.redis_url, settings)
    click.echo("configuration")
    click.echo(R.table(("variable", "value", "source"), R.config_rows(settings, Settings.sources())))
    click.echo("")
    problems = []
    seconds, _micros = client.time()  # leases expire by Redis time, not this host's
    pipe = client.pipeline(transaction=False)
    pipe.zcard(C.INFLIGHT)
    pipe.zcount(C.INFLIGHT, f"({seconds * 1000}", "+inf")
    leases, active = pipe.execute()
    click.echo(f"redis:      {redact_url(settings.redis_url)} answers, master {master_address(client.connection_pool)}")
    click.echo(f"roles on:   {P.role_servers(client, settings, settings.redis_url)}")
    click.echo(f"in flight:  {active} of P28_LATE_OBS_MAX_INFLIGHT={settings.late_obs_max_inflight}"
               + (f" ({leases - active} more past their lease, waiting for the sweeper)" if leases > active else ""))
    click.echo(f"wake path:  {R.wake_text(settings, P.wake_health(client))}")
    error = P.broker_error(settings)
    if error:
        problems.append("broker unreachable")
        click.echo(f"broker:     {redact_url(settings.broker)} UNREACHABLE: {error}")
        click.echo("workers:    unknown (broker unreachable)")
    else:
        click.echo(f"broker:     {redact_url(settings.broker)} answers, {P.queue_counts(settings)}")
        if settings.broker_is_redis and settings.broker != settings.redis_url:
            broker = P.connect(settings.broker, settings)
            click.echo(f"broker on:  {P.role_servers(broker, settings, settings.broker)}")
        workers = P.late_obs_workers(settings)
        if not workers:
            problems.append(f"no worker consumes {QUEUE}")
        click.echo(f"workers:    {len(workers)} consuming {QUEUE}" + (f": {', '.join(workers)}" if workers else ""))
    click.echo(R.heartbeat_text(P.heartbeats(client)))
    click.echo(f"heatbridge: {P.heat_bridge_lag(client)}")
    if strict and problems:
        raise click.ClickException("status check failed: " + "; ".join(problems))


# -- metrics --------------------------------------------------------------------------


@main.command()
@click.option("--port", type=click.IntRange(1, 65535),
              help=f"port to serve on [default: P28_METRICS_PORT, or {P.EXPORTER_PORT} when it is 0]")
@click.option("--addr", help="address to bind [default: P28_METRICS_ADDR, 0.0.0.0]")
def metrics(port: int | None, addr: str | None) -> None:
    """Serve /metrics from Redis without a worker (the standalone exporter).

    The counters live in Redis, so this page shows the same totals as any
    worker's. With P28_METRICS_PORT=0 in the env file (no worker serves
    /metrics) it serves on 8043, where `observer-tasks verify` on this host
    looks. Runs until SIGINT or SIGTERM.

    \b
    Examples:
      observer-tasks metrics
      observer-tasks metrics --port 9043 --addr 127.0.0.1
      curl -s localhost:9043/metrics | grep p28_late_obs_dropped_total
    """
    settings = P.load()
    if addr:
        settings = dataclasses.replace(settings, metrics_addr=addr)
    port = port or P.local_metrics_port(settings)
    P.serve_until_signal(settings, port)


# -- config check -----------------------------------------------------------------------


@main.group()
def config() -> None:
    """Check configuration before deploying it."""


@config.command("check")
@click.option("--env-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help=envfile.HELP + " [default: the environment]")
def config_check(env_file: Path | None) -> None:
    """Validate settings the way the worker will, and show the effective values.

    With --env-file, the file is read exactly as systemd's EnvironmentFile=
    reads it, and a line that systemd, a shell or docker's env_file would read
    differently is refused. Exit 2 with one line naming the line (or the
    variable and the value) when the file or a value would be refused, as the
    worker refuses it. Exit 2 too when Redis refuses the user in REDIS_URL (or
    in a Redis CELERY_BROKER_URL): a wrong password (WRONGPASS, NOAUTH) or a
    missing ACL permission for the observer's steps (NOPERM), as the worker
    refuses to start on it; a Redis that cannot be reached is not checked.
    Unknown P28_* names (typos) are warned about.

    \b
    Examples:
      observer-tasks config check --env-file /etc/quantum/apply-layer.env
      observer-tasks config check          # the current environment
    """
    if env_file:
        try:
            parsed = envfile.read(env_file)
        except envfile.EnvFileError as exc:
            raise P.Refused(str(exc)) from None
        values, origin = parsed.values, parsed.lines
    else:
        values, origin = dict(os.environ), {}
    try:
        settings = Settings.from_env(values)
    except SettingsError as exc:
        where = f"{env_file}:{origin[exc_name]}" if (exc_name := refused_name(str(exc), origin)) else None
        raise P.Refused(f"{where or env_file or 'environment'}: {exc}") from None
    # The worker refuses to start when Redis refuses its user; so does this check (an unreachable Redis passes).
    refused = access_problem(settings, P.CLI_TIMEOUT_S)
    if refused:
        raise P.Refused(f"{env_file or 'environment'}: {refused}")
    sources = {name: (f"{env_file}:{origin[name]}" if name in origin else source)
               for name, source in Settings.sources(values).items()}
    click.echo(R.table(("variable", "value", "source"), R.config_rows(settings, sources)))
    for name in sorted(set(values) - set(sources)):
        if name.startswith("P28_"):
            click.echo(f"warning: {name} is not a setting of the observer (typo?); it is ignored", err=True)


def refused_name(message: str, origin: dict[str, int]) -> str | None:
    """The variable a refusal names first, when the file set it (for path:line in the message)."""
    name = message.split("=", 1)[0]
    return name if name in origin else None


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
@click.option("--redis-url", help="run on this Redis instead of a private redis-server (REDIS_URL is never used)")
@click.option("--broker-url", help="with --redis-url: the broker (default: the --redis-url)")
@click.option("--force", is_flag=True, help="with --redis-url: write even to a Redis with a live worker or real plans")
def demo(**options: Any) -> None:
    """Run the whole pipeline on simulated plans for a bounded time, then report.

    A simulated apply layer publishes plans (XADD quantum:stream:apply.plan,
    observe(), observe_late()), a simulated HeatBridge writes their heat hashes
    after a lognormal delay (a share never gets heat), and a worker (started
    here unless one already consumes late_obs) observes them. Prints one
    progress line per second, waits for the plans in flight, and ends with the
    coverage per observation point, reasons, drops and latency. Only this run's
    plans (ids demo-<run>-<n>) are counted.

    It runs on a private redis-server (from PATH) that it starts and stops,
    whatever REDIS_URL and CELERY_BROKER_URL say, so a sourced production env
    file cannot send fake plans to the real streams. Given --redis-url, it
    runs there, but refuses a Redis with a live worker's heartbeat or with
    plans that are not a demo's unless told --force.

    \b
    Examples:
      observer-tasks demo
      observer-tasks demo --seconds 60 --rate 50 --heat-median-ms 900 --never-share 0.1
      P28_LATE_OBS_MAX_WAIT_MS=3000 observer-tasks demo --seed 7 --json
      observer-tasks demo --redis-url redis://127.0.0.1:6379/9 --broker-url redis://127.0.0.1:6379/10
    """
    raise SystemExit(demo_run.run(**options))


if __name__ == "__main__":
    main()
