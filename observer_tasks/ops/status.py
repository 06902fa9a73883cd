"""`observer-tasks status`: the configuration and the observer's state right now.

What this environment says, and what the running processes use (limits.py); plans in flight and the
backlog nobody decides; the wake path; the broker's late_obs messages and its consumers; each worker's
heartbeat; the Redis gaps the workers recorded; and the drops and refusals of the last seconds (window.py).
"""

from __future__ import annotations

import click
import redis

from ..core import contract as C
from ..core.connections import master_address
from ..core.messages import QUEUE
from ..core.settings import Settings
from ..core.timings import GAPS_KEEP_MS
from ..core.urls import redact_url
from . import broker as B
from . import limits as L
from . import probes as P
from .reports import broker_text, config_rows, heartbeat_text, table, wake_text
from .window import Snapshot, Window, gaps_since, measure, refusals_text

#: How many of the recorded gaps status lists (newest first).
GAPS_SHOWN = 5


@click.command()
@click.option("--check", "strict", is_flag=True,
              help="exit 1 when Redis or the broker is unreachable or no worker consumes late_obs")
@click.option("--window", "window_s", default=2.0, show_default=True, type=click.FloatRange(0.5, 600),
              help="how long to watch the counters for drops and refusals (s): status takes at least this long")
def status(strict: bool, window_s: float) -> None:
    """The effective configuration and the observer's state right now.

    Shows every variable with its value and source (env or default; passwords
    hidden) and the broker's precedence; the limits each running apply process
    (its report, every 10 s) and each worker (its heartbeat) uses, flagging a
    value that differs between them or from this environment; plans in flight
    against the running apply layers' MAX_INFLIGHT, and the backlog: plans past
    their deadline + sweeper grace that no worker decided; the late_obs messages
    on the broker (ready ones, and the ones parked for their countdown: kombu's
    unacked hash on Redis, unacknowledged messages on RabbitMQ, read with
    rabbitmqctl when it runs on this host); the workers consuming late_obs; each
    worker's heartbeat (age, wake listener, last push, resyncs); the Redis gaps
    the workers recorded in the last hour; the plans dropped and the calls
    refused in the last --window seconds; HeatBridge's consumer-group lag on
    quantum:stream:harvest.heat.decision.

    \b
    Examples:
      observer-tasks status
      observer-tasks status --check && echo ready     # for health checks and scripts
      observer-tasks status --window 30               # drops and refusals over a longer look
    """
    settings = P.load()
    client = P.connect(settings.redis_url, settings)
    window, problems = measure(client, settings, window_s, lambda before: state(settings, client, before))
    click.echo(recent_text(window))
    click.echo(f"heatbridge: {P.heat_bridge_lag(client)}")
    if strict and problems:
        raise click.ClickException("status check failed: " + "; ".join(problems))


def state(settings: Settings, client: redis.Redis, before: Snapshot) -> list[str]:
    """Print everything but the window's line; returns what fails --check."""
    click.echo("configuration")
    click.echo(table(("variable", "value", "source"), config_rows(settings, Settings.sources())))
    click.echo("")
    problems = []
    pipe = client.pipeline(transaction=False)
    pipe.zcard(C.INFLIGHT)
    pipe.zcount(C.INFLIGHT, f"({before.now_ms}", "+inf")  # leases expire by Redis time, not this host's
    leases, active = pipe.execute()
    processes = L.running(client)
    max_inflight, source = L.in_force(processes, "max_inflight", settings.late_obs_max_inflight)
    click.echo(f"redis:      {redact_url(settings.redis_url)} answers, master {master_address(client.connection_pool)}")
    click.echo(f"roles on:   {P.role_servers(client, settings, settings.redis_url)}")
    click.echo(f"in flight:  {active} of P28_LATE_OBS_MAX_INFLIGHT={max_inflight} ({source})")
    backlog = leases - active
    click.echo(f"backlog:    {backlog} plans past their deadline + sweeper grace that no worker decided"
               + (" (workers down or far behind: see the heartbeats; beyond "
                  f"{max_inflight} the apply layers refuse calls, cause backlog)" if backlog else ""))
    click.echo(f"wake path:  {wake_text(settings, P.wake_health(client))}")
    error = B.broker_error(settings)
    if error:
        problems.append("broker unreachable")
        click.echo(f"broker:     {broker_text(settings)} UNREACHABLE: {error}")
        click.echo("workers:    unknown (broker unreachable)")
    else:
        click.echo(f"broker:     {broker_text(settings)} answers, {B.queue_counts(settings)}")
        if settings.broker_is_redis and settings.broker != settings.redis_url:
            broker = P.connect(settings.broker, settings)
            click.echo(f"broker on:  {P.role_servers(broker, settings, settings.broker)}")
        workers = B.late_obs_workers(settings)
        if not workers:
            problems.append(f"no worker consumes {QUEUE}")
        click.echo(f"workers:    {len(workers)} consuming {QUEUE}" + (f": {', '.join(workers)}" if workers else ""))
    click.echo(heartbeat_text(P.heartbeats(client)))
    click.echo(limits_text(processes, settings))
    click.echo(gaps_text(client, before))
    return problems


def limits_text(processes: list[L.Process], settings: Settings) -> str:
    applies = sum(p.role == "apply" for p in processes)
    workers = len(processes) - applies
    everyone = [*processes, L.of_env(settings)]
    mismatches = L.mismatches(everyone)
    head = (f"limits:     {applies} apply process(es) and {workers} worker(s) report what they run with; "
            + (f"{len(mismatches)} MISMATCH(ES)" if mismatches else "no mismatch"))
    body = table(L.HEADERS, L.rows(everyone))
    return "\n".join([head, *("  " + line for line in body.splitlines()),
                      *(f"MISMATCH:   {line}" for line in mismatches)])


def gaps_text(client: redis.Redis, before: Snapshot) -> str:
    lifetime = sum(before.counts.samples["p28_late_obs_redis_gaps"].values())
    gaps = gaps_since(client, before.now_ms - GAPS_KEEP_MS)
    head = f"redis gaps: p28_late_obs_redis_gaps_total {lifetime};"
    if gaps is None:
        return f"{head} the recent ones unknown (this user may not ZRANGEBYSCORE {C.GAPS}: deploy/redis/users.acl)"
    if not gaps:
        return f"{head} none in the last {GAPS_KEEP_MS // 60_000} min"
    shown = [f"ended {(before.now_ms - g.end_ms) / 1000:.0f} s ago, lasted {(g.end_ms - g.start_ms) / 1000:.1f} s"
             for g in reversed(gaps[-GAPS_SHOWN:])]
    return f"{head} {len(gaps)} in the last {GAPS_KEEP_MS // 60_000} min: " + "; ".join(shown)


def recent_text(window: Window) -> str:
    dropped, refused = window.dropped, window.refused
    recorded = window.total("p28_observed")
    label = f"last {window.seconds:.0f} s:"
    return (f"{label:<11} dropped {dropped}, refused {sum(refused.values())}"
            + (f" ({refusals_text(refused)})" if refused else "") + f", recorded {recorded} (all time: dropped "
            f"{window.lifetime('p28_late_obs_dropped')}, refused {window.lifetime('p28_observe_refused')})")
