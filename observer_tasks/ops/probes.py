"""What the operator tools ask Redis and /metrics: settings, connections, heartbeats, HeatBridge's lag.

Every probe fails with one line (a click exception), never a traceback. Exit
codes: 2 when the configuration is refused (as the worker refuses it), 1 when
something cannot be reached or a check fails.
"""

from __future__ import annotations

import json
import signal
import threading
import urllib.request
from collections import Counter
from collections.abc import Mapping
from typing import Any

import click
import redis
import redis.sentinel
from prometheus_client.parser import text_string_to_metric_families

from ..core import contract as C
from ..core.connections import master_address, redis_client
from ..core.settings import Settings, SettingsError
from ..core.timings import SCRAPE_REDIS_TIMEOUT_S, WORKER_STALE_MS
from ..core.urls import parse_sentinel_url, redact_url
from ..worker.metrics import RedisCollector, read_counters, serve, tally
from .reports import Samples

#: Socket timeout of the command line's Redis connections (s).
CLI_TIMEOUT_S = 2.0
HEAT_DECISIONS = "quantum:stream:harvest.heat.decision"
HEAT_BRIDGE_GROUP = "heat_bridge"
#: Everything redis-py raises when Redis cannot answer (connection, timeout, BUSY, READONLY, ...).
REDIS_ERRORS = (redis.RedisError, OSError)
#: Where `observer-tasks metrics` serves when P28_METRICS_PORT is 0 (no worker on the host serves /metrics).
EXPORTER_PORT = Settings().metrics_port


class Refused(click.ClickException):
    """A configuration the worker would refuse: one line, exit code 2 (the worker's own refusal code)."""

    exit_code = 2


def load(environ: Mapping[str, str] | None = None) -> Settings:
    try:
        return Settings.from_env(environ)
    except SettingsError as exc:
        raise Refused(str(exc)) from None


def connect(url: str, settings: Settings | None = None, timeout: float = CLI_TIMEOUT_S) -> redis.Redis:
    """A fail-fast client that has answered PING, or one line and exit 1 (``settings``: Sentinel's credentials)."""
    client = redis_client(url, timeout, "cli", settings)
    try:
        client.ping()
    except REDIS_ERRORS as exc:
        raise click.ClickException(f"cannot reach Redis at {redact_url(url)}: {exc}") from None
    return client


def recent(client: redis.Redis, settings: Settings, count: int) -> list[dict[str, str]]:
    """The newest `count` entries of the observed stream (XREVRANGE ... COUNT count), as text."""
    return [{k.decode(errors="replace"): v.decode(errors="replace") for k, v in fields.items()}
            for _id, fields in client.xrevrange(settings.obs_stream, count=count)]


# -- /metrics ----------------------------------------------------------------------------


def local_metrics_port(settings: Settings) -> int:
    """This host's /metrics port: the workers' P28_METRICS_PORT, or the exporter's when that is 0."""
    return settings.metrics_port or EXPORTER_PORT


def local_metrics_url(settings: Settings) -> str:
    """Where this host's /metrics answers; a wildcard bind address is reached on loopback."""
    addr = settings.metrics_addr
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(addr, addr)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{local_metrics_port(settings)}/metrics"


def why_unreadable(settings: Settings, explicit: bool) -> str:
    if explicit:
        return "worker or exporter stopped, or metrics disabled there?"
    if settings.metrics_port:
        return (f"no worker on this host serves /metrics on P28_METRICS_PORT={settings.metrics_port} (stopped?); "
                "pass --metrics-url http://HOST:PORT/metrics to read another host's")
    return (f"P28_METRICS_PORT=0, so no worker on this host serves /metrics, and no `observer-tasks metrics` "
            f"exporter answers on its default port {EXPORTER_PORT}: start one, or pass --metrics-url "
            "http://HOST:PORT/metrics of a worker or exporter")


def serve_until_signal(settings: Settings, port: int) -> None:
    """The standalone exporter: /metrics from Redis on settings.metrics_addr:port until SIGINT or SIGTERM."""
    connect(settings.redis_url, settings).close()  # reachable now, or one line and exit 1
    client = redis_client(settings.redis_url, SCRAPE_REDIS_TIMEOUT_S, "metrics", settings)
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


def scrape(url: str) -> Samples:
    """The samples of a /metrics page; OSError or ValueError when it cannot be read."""
    with urllib.request.urlopen(url, timeout=CLI_TIMEOUT_S) as resp:
        text = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def heat_wait_histogram(settings: Settings, client: redis.Redis) -> tuple[list[tuple[str, float]], int, float]:
    """The all-time heat-wait histogram as /metrics shows it: (le, cumulative count) buckets, count, sum (s)."""
    counts = tally(read_counters(client), settings)
    family = RedisCollector(settings, client).histogram(counts)
    buckets = [(s.labels["le"], s.value) for s in family.samples if s.name.endswith("_bucket")]
    return buckets, sum(counts.buckets.values()), counts.wait_sum_ms / 1000




# -- which server each role is on -------------------------------------------------------------


def role_servers(client: redis.Redis, settings: Settings, url: str) -> str:
    """Where the observer's named connections are: for each server (with Sentinel: the master it names now
    and its replicas) the roles with connections there, by CLIENT LIST. A role on a replica is on a demoted
    master: it has not followed the failover."""
    pool = client.connection_pool
    servers: list[tuple[str, str, redis.Redis]] = [(master_address(pool), "master", client)]
    if isinstance(pool, redis.sentinel.SentinelConnectionPool):
        target = parse_sentinel_url(url)
        for host, port in pool.sentinel_manager.discover_slaves(target.service):
            plain = target.server_url().replace("sentinel-master", f"{host}:{port}", 1)
            servers.append((f"{host}:{port}", "replica", redis_client(plain, CLI_TIMEOUT_S, "cli")))
    parts = []
    for address, kind, server in servers:
        try:
            names = [c.get("name", "") for c in server.client_list()]
        except REDIS_ERRORS as exc:
            parts.append(f"{address} ({kind}): unknown ({exc})")
            continue
        # The command line's own connections (this one among them) come and go: not listed.
        roles = Counter(n.split(":", 1)[1] for n in names
                        if n.startswith("observer_tasks:") and n != "observer_tasks:cli")
        listed = ", ".join(f"{role} {n}" for role, n in sorted(roles.items())) or "none"
        parts.append(f"{address} ({kind}): {listed}")
    return "; ".join(parts)


# -- workers' heartbeats, HeatBridge ----------------------------------------------------------


def heartbeats(client: redis.Redis) -> list[dict[str, Any]]:
    """Each worker's heartbeat with its ages in ms against Redis TIME (the writers' clock)."""
    now_ms = redis_now_ms(client)
    out = []
    for name, raw in sorted(client.hgetall(C.WORKERS).items()):
        try:
            beat = json.loads(raw)
            seen = int(beat["seen_ms"])
        except (ValueError, TypeError, KeyError):
            out.append({"name": name.decode(errors="replace"), "unreadable": raw[:80].decode(errors="replace")})
            continue
        # The heartbeat carries the push's age when it was written; add how old the heartbeat is.
        push_age = beat.get("last_push_age_ms")
        out.append({"name": name.decode(errors="replace"), "age_ms": now_ms - seen,
                    "fresh": now_ms - seen <= WORKER_STALE_MS, "host": beat.get("host"), "pid": beat.get("pid"),
                    "wake": beat.get("wake"), "resyncs": beat.get("resyncs"),
                    "on": beat.get("redis_master"), "wake_on": beat.get("wake_master"),
                    "last_push_age_ms": None if push_age is None else int(push_age) + now_ms - seen})
    return out


def redis_now_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def wake_health(client: redis.Redis) -> bool:
    """The wake path's health as the chains read it (the key the workers' heartbeats keep)."""
    return bool(client.exists(C.WAKE))


def heat_bridge_lag(client: redis.Redis) -> str:
    if not client.exists(HEAT_DECISIONS):
        return f"{HEAT_DECISIONS} does not exist on this Redis"
    for group in client.xinfo_groups(HEAT_DECISIONS):
        name = group["name"].decode() if isinstance(group["name"], bytes) else group["name"]
        if name == HEAT_BRIDGE_GROUP:
            return (f"group {HEAT_BRIDGE_GROUP} on {HEAT_DECISIONS}: lag {group.get('lag')}, "
                    f"pending {group.get('pending')}")
    return f"no consumer group {HEAT_BRIDGE_GROUP} on {HEAT_DECISIONS}"
