"""What the operator tools ask the broker: the tools' own Celery app, whether it answers, who consumes late_obs,
and how many late_obs messages wait (ready, or parked for their countdown).

Every probe fails with one line, never a traceback.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from urllib.parse import unquote, urlsplit

from amqp.exceptions import AccessRefused, NotAllowed, NotFound
from celery import Celery

from ..core.app import CONFIG_MODULE
from ..core.messages import QUEUE
from ..core.settings import Settings
from .probes import CLI_TIMEOUT_S, connect

#: The tools' Redis-broker visibility timeout (s): ten years, so they never restore a worker's messages.
TOOLS_VISIBILITY_TIMEOUT_S = 10 * 365 * 86_400
#: How long `rabbitmqctl list_queues` may take (s).
RABBITMQCTL_TIMEOUT_S = 10.0
#: What RabbitMQ answers a user it refuses (a wrong password: 403) or a vhost it may not open (530): a
#: configuration error, like a Redis user Redis refuses.
AMQP_REFUSALS = (AccessRefused, NotAllowed)


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


def broker_failure(settings: Settings) -> Exception | None:
    """What the broker answered a connection (an exception), or None when it answers."""
    try:
        with use_broker(settings).connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=CLI_TIMEOUT_S)
    except Exception as exc:  # kombu raises many types for a broker that is down
        return exc
    return None


def broker_error(settings: Settings) -> str | None:
    """Why the broker cannot be reached, or None when it answers."""
    failure = broker_failure(settings)
    return None if failure is None else f"{failure}"


def late_obs_workers(settings: Settings, timeout: float = 1.0) -> list[str]:
    """Names of the workers that consume the late_obs queue (Celery's control API)."""
    replies = use_broker(settings).control.inspect(timeout=timeout).active_queues() or {}
    return sorted(name for name, queues in replies.items() if any(q.get("name") == QUEUE for q in queues or ()))


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
