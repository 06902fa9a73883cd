"""What the operator tools ask Redis, the broker and /metrics: settings, connections, queues, workers.

Every probe fails with one line (a click exception), never a traceback. Exit
codes: 2 when the configuration is refused (as the worker refuses it), 1 when
something cannot be reached or a check fails.
"""

from __future__ import annotations

import functools
import json
import shutil
import signal
import subprocess
import threading
import urllib.request
from collections import Counter
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

import click
import redis
import redis.sentinel
from amqp.exceptions import NotFound
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from ..core import contract as C
from ..core.app import CONFIG_MODULE
from ..core.connections import master_address, redis_client
from ..core.messages import QUEUE
from ..core.settings import Settings, SettingsError
from ..core.timings import WORKER_STALE_MS
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
#: The tools' Redis-broker visibility timeout (s): ten years, so they never restore a worker's messages.
TOOLS_VISIBILITY_TIMEOUT_S = 10 * 365 * 86_400
#: How long `rabbitmqctl list_queues` may take (s).
RABBITMQCTL_TIMEOUT_S = 10.0


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


@functools.lru_cache(maxsize=4)
def use_broker(settings: Settings) -> Celery:
    """A Celery app of the tools' own for this broker (control, inspect, queue probes).

    Not the package's app: Celery caches its connection pool at first use, so re-pointing a shared app's
    broker_url would leave control messages on the old broker. The worker's Celery settings apply.
    """
    tool = Celery("observer_tasks", set_as_current=False)
    tool.config_from_object(CONFIG_MODULE)
    url, options, ssl = settings.celery_broker()
    # The read and write URLs: Celery lets the CELERY_BROKER_URL variable override broker_url.
    tool.conf.broker_url = tool.conf.broker_read_url = tool.conf.broker_write_url = url
    # kombu's Redis transport restores other consumers' unacknowledged messages whenever it consumes (here:
    # control replies). That is the workers' job; with this timeout the tools never find one old enough,
    # so their Redis user needs no write access to the queue (deploy/redis/users.acl).
    tool.conf.broker_transport_options = {**tool.conf.broker_transport_options, **options,
                                          "visibility_timeout": TOOLS_VISIBILITY_TIMEOUT_S}
    tool.conf.broker_use_ssl = ssl
    return tool


def broker_error(settings: Settings) -> str | None:
    """Why the broker cannot be reached, or None when it answers."""
    try:
        with use_broker(settings).connection_for_write() as conn:
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
    client = connect(settings.redis_url, settings)
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


# -- the late_obs queue on the broker -------------------------------------------------------


def queue_counts(settings: Settings) -> str:
    """late_obs's messages on the broker: ready ones and parked ones (countdown/ETA, held by workers)."""
    if settings.broker_is_redis:
        ready, parked = redis_queue(settings)
        return f"{QUEUE} queue length {ready + parked} ({ready} ready, {parked} parked for their countdown)"
    declared, unacked = amqp_queue(settings)
    if declared is None:
        return f"no {QUEUE} queue on the broker yet (a worker declares it when it starts)"
    if unacked.isdigit():
        return (f"{QUEUE} queue length {declared + int(unacked)} ({declared} ready, {unacked} unacknowledged: "
                "parked for their countdown)")
    return f"{QUEUE} queue length unknown ({declared} ready, unacknowledged {unacked})"


def redis_queue(settings: Settings) -> tuple[int, int]:
    """Ready: LLEN of the queue's priority lists. Parked: kombu's `unacked` hash entries routed to late_obs.

    A worker fetches countdown messages at once and holds them until their time comes: kombu keeps each
    in the `unacked` hash (value: JSON [message, exchange, routing_key]) and `unacked_index` until it is
    acknowledged, so LLEN alone shows 0 with hundreds of plans waiting.
    """
    options = {**use_broker(settings).conf.broker_transport_options}
    prefix = options.get("global_keyprefix", "")
    unacked = prefix + options.get("unacked_key", "unacked")
    steps = options.get("priority_steps", [0, 3, 6, 9])
    sep = options.get("sep", "\x06\x16")
    client = connect(settings.broker, settings)
    pipe = client.pipeline(transaction=False)
    for step in steps:
        pipe.llen(prefix + (f"{QUEUE}{sep}{step}" if step else QUEUE))
    ready = sum(pipe.execute())
    parked = sum(_routed_to_queue(raw) for _tag, raw in client.hscan_iter(unacked, count=1000))
    return ready, parked


def _routed_to_queue(raw: bytes) -> bool:
    try:
        message, _exchange, routing_key = json.loads(raw)
        info = message.get("properties", {}).get("delivery_info", {})
    except (ValueError, TypeError, AttributeError):
        return False  # not kombu's format: not ours to count
    return QUEUE in (routing_key, info.get("routing_key"))


def amqp_queue(settings: Settings) -> tuple[int | None, str]:
    """Ready messages by a passive queue_declare (None: no such queue); unacknowledged ones (a worker
    holds countdown messages unacknowledged) from `rabbitmqctl list_queues` when it runs here, as AMQP
    cannot tell them."""
    with use_broker(settings).connection_for_read() as conn:
        try:
            _name, ready, _consumers = conn.default_channel.queue_declare(QUEUE, passive=True)
        except NotFound:
            return None, "0"
    return int(ready), rabbitmqctl_unacked(settings.broker)


def rabbitmqctl_unacked(url: str) -> str:
    parts = urlsplit(url)
    if parts.hostname not in ("localhost", "127.0.0.1", "::1"):
        return f"unknown (the broker is not on this host: needs rabbitmqctl on {parts.hostname} or the management API)"
    exe = shutil.which("rabbitmqctl")
    if not exe:
        return "unknown (needs rabbitmqctl or the management API)"
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    try:
        done = subprocess.run([exe, "-q", "list_queues", "-p", vhost, "--formatter", "json", "name",
                               "messages_unacknowledged"], capture_output=True, text=True,
                              timeout=RABBITMQCTL_TIMEOUT_S)
        rows = json.loads(done.stdout) if done.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError):
        rows = None
    if not isinstance(rows, list):
        return "unknown (rabbitmqctl failed: run as root or the rabbitmq user, or use the management API)"
    for row in rows:
        if isinstance(row, dict) and row.get("name") == QUEUE:
            return str(row.get("messages_unacknowledged"))
    return "0"


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
