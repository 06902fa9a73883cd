"""observer-tasks: the operator's command line for the late heat observer (the group and its small commands).

Every command reads the same environment as the worker (REDIS_URL, the broker's
variables, P28_*). Exit codes: 2 and one line when the configuration is refused
(as the worker refuses it), 1 and one line when Redis or the broker cannot be
reached or a check fails. Each larger command is a module of its own (status,
verify, latency, config); the arithmetic and tables live in ``reports``, the
questions to Redis and /metrics in ``probes``, to the broker in ``broker``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import click
import redis

from . import demo as demo_run
from . import probes as P
from .config import config
from .latency import latency
from .reports import coverage, coverage_table
from .status import status
from .verify import verify


class Main(click.Group):
    """A Redis failure in the middle of any command ends it with one line, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except redis.RedisError as exc:
            raise click.ClickException(f"Redis: {exc}") from None


@click.group(cls=Main, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Operate the P2.8A.3 late heat observer (reads REDIS_URL, the broker's variables and P28_*).

    Exit codes: 0 ok, 1 a check failed or Redis/the broker cannot be reached,
    2 the configuration is refused (as the worker would refuse it).

    \b
    Examples:
      observer-tasks status --check      # configuration, running limits, in-flight plans, queue, workers
      observer-tasks verify              # the post-deploy verifications, drops and refusals over 10 s
      observer-tasks coverage            # heat coverage per observation point
      observer-tasks latency             # publish -> heat latency and a recommended MAX_WAIT_MS
      observer-tasks config check        # the settings, and whether Redis and the broker answer
      observer-tasks demo                # the whole pipeline on simulated plans for 20 s
    """


for command in (status, verify, latency, config):
    main.add_command(command)


@main.command("coverage")
@click.option("--count", default=600, show_default=True, type=click.IntRange(1),
              help="how many of the newest stream entries to read (XREVRANGE COUNT)")
def coverage_cmd(count: int) -> None:
    """Heat coverage per observation point (Verification 1).

    Counts obs_point and heat_found over the newest COUNT entries of the
    observed stream, like the runbook's redis-cli | awk pipeline, plus the
    coverage (share with heat found) of each point. Every configured point
    (P28_HEAT_OBS_POINTS, then publish_plan_post) has its rows, 0 where it has
    no entries. Expected after deploy: publish_plan_post 50-90%, the early
    points low.

    \b
    Examples:
      observer-tasks coverage
      observer-tasks coverage --count 5000
      REDIS_URL=redis://10.0.0.5:6379/0 observer-tasks coverage
    """
    settings = P.load()
    entries = P.recent(P.connect(settings.redis_url, settings), settings, count)
    click.echo(f"last {len(entries)} entries of {settings.obs_stream}")
    click.echo(coverage_table(coverage(entries, settings.obs_points)))


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
    observe() at create_apply_plan, and for its RECONCILE_CLOSE plans at the
    other configured early points, reconcile_close_consume by default;
    observe_late()), a simulated HeatBridge writes their heat hashes after a
    lognormal delay (a share never gets heat), and a worker (started here
    unless one already consumes late_obs) observes them. Prints one progress
    line per second, waits for the plans in flight, and ends with the coverage
    per observation point (every configured one), reasons, drops and latency.
    Only this run's plans (ids demo-<run>-<n>) are counted.

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
