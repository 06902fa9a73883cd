"""The settings object: every variable, its default and unit, and strict parsing.

Every default lives in the ``Settings`` dataclass below and nowhere else. Each
field's metadata names its environment variable, its bounds and its meaning, so
``from_env`` can validate every value the same way and refuse a bad one with
one line that names the variable and the value.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import quote, unquote, urlsplit

TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
FALSE_WORDS = frozenset({"false", "0", "no", "off"})

#: Stream length kept by XADD ... MAXLEN ~ (approximate trimming, entries).
STREAM_MAXLEN = 10_000

# The interlocked timings, in one place. Each must cover the ones it depends on; Settings derives the
# ones that depend on settings (sweep_grace_ms, visibility_timeout_s) and checks the rest at start-up.
#: Socket timeout of the apply layer's Redis and broker calls (s): the most a call can stall its caller.
CALL_TIMEOUT_S = 0.05
#: Socket timeout of the worker's Redis client (s): a look that takes longer is a failed look.
LOOKUP_TIMEOUT_S = 0.5
#: How long a task keeps trying to record redis_error before leaving the plan to the sweeper (s).
RECORD_PATIENCE_S = 2.0
#: Least time a lease outlives its plan's deadline before the sweeper records it (ms); see sweep_grace_ms.
MIN_SWEEP_GRACE_MS = 5_000
#: How often each worker's sweeper looks for overdue leases (s).
SWEEP_INTERVAL_S = 1.0
#: Most overdue leases one sweep step records (plans; the sweeper pages through the rest).
SWEEP_BATCH = 200
#: How often each worker writes its heartbeat and wake-path health to Redis (s).
HEARTBEAT_S = 0.5
#: How long one heartbeat vouches for the wake path (ms): four missed beats and the chain polls at POLL_MS.
WAKE_HEALTH_TTL_MS = 2_000
#: The wake listener's liveness check (s): after this long without a byte it sends PING (and asks Sentinel
#: whether the master moved); a PING unanswered for WAKE_SILENT_S more means the connection is lost.
#: Together with one heartbeat (HEARTBEAT_S) the chains poll at POLL_MS within ~3.5 s of a silent drop.
WAKE_PING_S = 1.0
WAKE_SILENT_S = 2.0
#: A worker whose heartbeat is older than this is counted as gone (ms).
WORKER_STALE_MS = 10_000
#: A gone worker's heartbeat entry is removed after this (ms).
WORKER_FORGET_MS = 60_000
#: Least visibility timeout of the Redis broker (s): kombu restores a killed worker's messages after it.
MIN_VISIBILITY_TIMEOUT_S = 30
#: The safety interval used when P28_LATE_OBS_SAFETY_POLL_MS is not set (ms), clamped to POLL..MAX_WAIT.
#: Chosen by measurement (docs/performance.md): a third of polling-only's worker CPU, same detection.
DEFAULT_SAFETY_POLL_MS = 1000


#: Redis through Sentinel: ``redis+sentinel://[user:pass@]host[:port][,host[:port]...]/service[/db][?query]``; the
#: ``rediss+sentinel`` form speaks TLS to the sentinels and the servers. user:pass and the query (redis-py's
#: ``ssl_*`` options) are the data servers'; the sentinels' own user and password are P28_SENTINEL_*.
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
#: Sentinel's port when a host in a sentinel URL gives none.
SENTINEL_DEFAULT_PORT = 26379
#: Schemes that name a Redis Cluster, refused until it is built (docs/architecture.md#beyond-one-redis).
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster", "redis-cluster", "cluster")
REDIS_SCHEMES = ("redis", "rediss", *SENTINEL_SCHEMES)
#: P28_LATE_OBS_QUEUE_TYPE's values: RabbitMQ's queue types for late_obs.
QUEUE_TYPES = ("classic", "quorum")
AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")


class SettingsError(ValueError):
    """A variable holds a value the observer refuses; the message is one line."""


def _var(env: str, help: str, *, lo: int | None = None, hi: int | None = None) -> dict[str, Any]:
    return {"env": env, "help": help, "lo": lo, "hi": hi}


@dataclass(frozen=True)
class Settings:
    """Everything the observer reads from the environment, with defaults and units."""

    heat_obs_enabled: bool = field(default=True, metadata=_var("P28_HEAT_OBS_ENABLED", "early observer on/off"))
    obs_stream: str = field(
        default="quantum:stream:apply.heat.observed",
        metadata=_var("P28_HEAT_OBS_STREAM", "output stream of observations"),
    )
    heat_lookup_prefix: str = field(
        default="quantum:harvest:heat:by_plan:",
        metadata=_var("P28_HEAT_LOOKUP_PREFIX", "prefix of HeatBridge's heat hash per plan"),
    )
    dedupe_ttl_sec: int = field(
        default=600, metadata=_var("P28_DEDUPE_TTL_SEC", "dedupe window (s)", lo=1, hi=7 * 86_400)
    )
    max_debug_chars: int = field(
        default=400, metadata=_var("P28_MAX_DEBUG_CHARS", "debug_json size cap (characters)", lo=2, hi=65_536)
    )
    late_obs_enabled: bool = field(
        default=True, metadata=_var("P28_LATE_OBS_ENABLED", "late observer on/off (the rollback switch)")
    )
    late_obs_max_wait_ms: int = field(
        default=2000, metadata=_var("P28_LATE_OBS_MAX_WAIT_MS", "how long to wait for heat (ms)", lo=1, hi=600_000)
    )
    late_obs_poll_ms: int = field(
        default=100, metadata=_var("P28_LATE_OBS_POLL_MS", "interval between looks (ms)", lo=10, hi=60_000)
    )
    late_obs_max_workers: int = field(
        default=4, metadata=_var("P28_LATE_OBS_MAX_WORKERS", "worker concurrency", lo=1, hi=256)
    )
    late_obs_max_inflight: int = field(
        default=200,
        metadata=_var("P28_LATE_OBS_MAX_INFLIGHT", "plans under late observation at once", lo=1, hi=1_000_000),
    )
    late_obs_wake: bool = field(
        default=True,
        metadata=_var("P28_LATE_OBS_WAKE", "record a plan the moment its heat hash is written (polls stay as safety)"),
    )
    # 0 means "not set": DEFAULT_SAFETY_POLL_MS clamped to POLL_MS..MAX_WAIT_MS (see safety_poll_ms).
    late_obs_safety_poll_ms: int = field(
        default=0,
        metadata=_var("P28_LATE_OBS_SAFETY_POLL_MS", "interval between looks while the wake path is healthy (ms)",
                      lo=0, hi=600_000),
    )
    late_obs_queue_type: str = field(
        default="classic",
        metadata=_var("P28_LATE_OBS_QUEUE_TYPE", "RabbitMQ type of the late_obs queue: classic or quorum"))
    replica_wait_ms: int = field(
        default=0,
        metadata=_var("P28_REPLICA_WAIT_MS", "after each admission and record, WAIT this long for one replica (ms, "
                      "0: off); within the apply layer's call cap", lo=0, hi=int(CALL_TIMEOUT_S * 1000) - 10))
    redis_url: str = field(
        default="redis://localhost:6379/0", metadata=_var("REDIS_URL", "Redis holding heat, stream and counters")
    )
    # Empty means "the same as REDIS_URL"; see ``broker``.
    broker_url: str = field(default="", metadata=_var("CELERY_BROKER_URL", "Celery broker (default: REDIS_URL)"))
    # Empty means "no password" / "no ACL user" at the sentinels (the data servers' are in the URL).
    sentinel_username: str = field(
        default="", metadata=_var("P28_SENTINEL_USERNAME", "ACL user at the sentinels of a *+sentinel:// URL"))
    sentinel_password: str = field(
        default="", metadata=_var("P28_SENTINEL_PASSWORD", "password at the sentinels of a *+sentinel:// URL"))
    metrics_port: int = field(
        default=8043, metadata=_var("P28_METRICS_PORT", "worker /metrics port (0 disables)", lo=0, hi=65_535)
    )
    metrics_addr: str = field(
        default="0.0.0.0", metadata=_var("P28_METRICS_ADDR", "address the /metrics server binds to")
    )
    kombu_guard: bool = field(
        default=True,
        metadata=_var("P28_KOMBU_GUARD", "worker: guard kombu's Redis transport against a restart crash (diagnosis)"),
    )

    def __post_init__(self) -> None:
        poll, wait, safety = self.late_obs_poll_ms, self.late_obs_max_wait_ms, self.late_obs_safety_poll_ms
        if poll > wait:
            raise SettingsError(f"P28_LATE_OBS_POLL_MS={poll} is above P28_LATE_OBS_MAX_WAIT_MS={wait}: "
                                "the observer would never look twice")
        if safety and not poll <= safety <= wait:
            raise SettingsError(f"P28_LATE_OBS_SAFETY_POLL_MS={safety} is outside P28_LATE_OBS_POLL_MS={poll}"
                                f"..P28_LATE_OBS_MAX_WAIT_MS={wait}")
        kind = self.late_obs_queue_type
        if kind not in QUEUE_TYPES:
            raise SettingsError(f"P28_LATE_OBS_QUEUE_TYPE={kind!r} is not one of {'/'.join(QUEUE_TYPES)}")
        if kind == "quorum":
            if self.broker_is_redis:
                raise SettingsError("P28_LATE_OBS_QUEUE_TYPE=quorum needs a RabbitMQ broker (CELERY_BROKER_URL="
                                    f"amqp://...), not {redact_url(self.broker)!r}")
            # Celery's native delayed delivery (how a quorum queue takes a countdown) counts whole seconds.
            for env, ms in (("P28_LATE_OBS_POLL_MS", poll), ("P28_LATE_OBS_SAFETY_POLL_MS", self.safety_poll_ms)):
                if ms % 1000:
                    raise SettingsError(f"{env}={ms} with P28_LATE_OBS_QUEUE_TYPE=quorum: RabbitMQ's native "
                                        "delayed delivery counts whole seconds; use a multiple of 1000")

    @property
    def safety_poll_ms(self) -> int:
        """The chain's interval while the wake path is healthy (ms)."""
        if self.late_obs_safety_poll_ms:
            return self.late_obs_safety_poll_ms
        return min(max(DEFAULT_SAFETY_POLL_MS, self.late_obs_poll_ms), self.late_obs_max_wait_ms)

    @property
    def sweep_grace_ms(self) -> int:
        """How long past the deadline a lease waits for its task before the sweeper records it (ms).

        Covers a final look that runs one POLL_MS late, its lookup and the task's record patience,
        so the sweeper never records a plan whose task is about to.
        """
        task_ms = self.late_obs_poll_ms + int(1000 * (2 * LOOKUP_TIMEOUT_S + RECORD_PATIENCE_S))
        return max(MIN_SWEEP_GRACE_MS, task_ms + 1000)

    @property
    def visibility_timeout_s(self) -> int:
        """The Redis broker's visibility timeout (s): longer than any message is legitimately unacked.

        A countdown message stays unacked in the worker until its ETA (at most the longer poll interval)
        and then runs (lookups plus the record patience); a shorter timeout would redeliver live messages.
        """
        held_ms = max(self.late_obs_poll_ms, self.safety_poll_ms) + 1000 * (2 * LOOKUP_TIMEOUT_S + RECORD_PATIENCE_S)
        return max(MIN_VISIBILITY_TIMEOUT_S, int(held_ms / 1000) + 10)

    @property
    def broker(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def broker_is_redis(self) -> bool:
        return urlsplit(self.broker).scheme in REDIS_SCHEMES

    def celery_broker(self) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
        """The broker as kombu takes it: (URL, transport options to add, ``broker_use_ssl``).

        A ``redis+sentinel://`` broker becomes kombu's own form, ``sentinel://h1:p1;sentinel://h2:p2/db`` with
        ``master_name`` and the sentinels' credentials in the transport options, so one URL form serves
        REDIS_URL and CELERY_BROKER_URL (and the broker can default to REDIS_URL).
        """
        url = self.broker
        if urlsplit(url).scheme not in SENTINEL_SCHEMES:
            return url, {}, None
        target = parse_sentinel_url(url)
        auth = ""
        if target.username or target.password:
            auth = f"{quote(target.username, safe='')}:{quote(target.password, safe='')}@"
        hosts = ";".join(f"sentinel://{auth}{_host(h)}:{p}/{target.db}" for h, p in target.sentinels)
        sentinel_kwargs: dict[str, Any] = {**self.sentinel_auth(), "socket_timeout": 1.0,
                                           "socket_connect_timeout": 1.0}
        ssl = None
        if target.tls:
            ssl = dict(target.ssl_options)
            sentinel_kwargs.update(ssl=True, **ssl)
        return hosts, {"master_name": target.service, "sentinel_kwargs": sentinel_kwargs}, ssl

    def sentinel_auth(self) -> dict[str, str]:
        """The sentinels' own credentials as redis-py connection arguments."""
        auth = {}
        if self.sentinel_username:
            auth["username"] = self.sentinel_username
        if self.sentinel_password:
            auth["password"] = self.sentinel_password
        return auth

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every variable; raise SettingsError on the first bad one."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is not None:
                values[f.name] = _parse(f, raw)
        return cls(**values)

    @classmethod
    def sources(cls, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """Where each variable's value comes from: 'env' or 'default'."""
        environ = os.environ if environ is None else environ
        names = [f.metadata["env"] for f in dataclasses.fields(cls)]
        return {name: ("env" if name in environ else "default") for name in names}

    def as_env(self, redact: bool = True) -> dict[str, str]:
        """The effective values keyed by variable, passwords hidden unless redact=False."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "late_obs_safety_poll_ms":
                value = self.safety_poll_ms  # the interval in force, not the "not set" marker
            text = str(value).lower() if isinstance(value, bool) else str(value)
            if f.name in ("redis_url", "broker_url") and redact:
                text = redact_url(text)
            if f.name == "sentinel_password" and redact and text:
                text = "***"
            out[f.metadata["env"]] = text
        return out

    def startup_lines(self, workers: int | None = None) -> list[str]:
        """The contract's first two start-up lines, which operators grep for."""
        late = f"P2.8A.3 Late Observer: {self.late_obs_enabled}"
        if self.late_obs_enabled:
            late += (
                f" (wait={self.late_obs_max_wait_ms}ms, poll={self.late_obs_poll_ms}ms, "
                f"workers={workers or self.late_obs_max_workers}, max_inflight={self.late_obs_max_inflight})"
            )
        return [f"P2.8A Heat Observer: {self.heat_obs_enabled}", late]

    def wake_line(self) -> str:
        """The worker's fourth start-up line."""
        if self.late_obs_enabled and self.late_obs_wake:
            return f"P2.8A.3: wake path on (safety_poll={self.safety_poll_ms}ms)"
        return "P2.8A.3: wake path off"


def _parse(f: dataclasses.Field[Any], raw: str) -> Any:
    env, text = f.metadata["env"], raw.strip()
    if f.type == "bool":
        word = text.lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise SettingsError(f"{env}={raw!r} is not a boolean (use true/false, 1/0, yes/no, on/off)")
    if f.type == "int":
        if not re.fullmatch(r"[+-]?\d{1,12}", text):
            raise SettingsError(f"{env}={raw!r} is not a whole number")
        number, lo, hi = int(text), f.metadata["lo"], f.metadata["hi"]
        if number < lo or number > hi:
            raise SettingsError(f"{env}={raw!r} is out of range ({lo}..{hi})")
        return number
    if not text or any(ch.isspace() or not ch.isprintable() for ch in text):
        raise SettingsError(f"{env}={raw!r} must be a non-empty string without spaces")
    if env in ("REDIS_URL", "CELERY_BROKER_URL"):
        check_url(env, text)
    return text


def check_url(env: str, url: str) -> None:
    """Refuse, in one line, a URL the observer cannot use for this variable."""
    scheme = urlsplit(url).scheme
    shown = redact_url(url)
    if scheme in CLUSTER_SCHEMES or (scheme in ("redis", "rediss") and "," in urlsplit(url).netloc):
        raise SettingsError(f"{env}={shown!r}: Redis Cluster is not supported (each step's keys would need one "
                            "slot; docs/architecture.md#beyond-one-redis); use one server or redis+sentinel://")
    if scheme == "sentinel":
        raise SettingsError(f"{env}={shown!r}: write a Sentinel URL as redis+sentinel://host:port[,host:port]/"
                            "service[/db] (the broker is translated to kombu's form)")
    # No unix://: kombu has no such transport, so the broker (which defaults to REDIS_URL) could not start.
    allowed = REDIS_SCHEMES if env == "REDIS_URL" else (*REDIS_SCHEMES, *AMQP_SCHEMES)
    if scheme not in allowed:
        raise SettingsError(f"{env}={shown!r} must be a URL with scheme {'/'.join(allowed)}")
    if scheme in SENTINEL_SCHEMES:
        try:
            parse_sentinel_url(url)
        except ValueError as exc:
            raise SettingsError(f"{env}={shown!r}: {exc}") from None


class SentinelURL(NamedTuple):
    """A ``redis+sentinel://`` URL taken apart."""

    sentinels: list[tuple[str, int]]
    service: str
    db: int
    username: str
    password: str
    tls: bool
    query: str  # redis-py's URL options (ssl_cert_reqs, ssl_ca_certs, ...), applied to every connection

    @property
    def ssl_options(self) -> dict[str, str]:
        return dict(part.split("=", 1) for part in self.query.split("&") if part.startswith("ssl_") and "=" in part)

    def server_url(self) -> str:
        """A redis[s]:// URL with this URL's credentials, database and options, for redis-py to parse (its
        host is a placeholder: Sentinel names the master)."""
        auth = ""
        if self.username or self.password:
            auth = f"{quote(self.username, safe='')}:{quote(self.password, safe='')}@"
        return (f"{'rediss' if self.tls else 'redis'}://{auth}sentinel-master/{self.db}"
                + (f"?{self.query}" if self.query else ""))


def parse_sentinel_url(url: str) -> SentinelURL:
    """``redis+sentinel://[user:pass@]h1[:p1][,h2[:p2]...]/service[/db][?query]``; ValueError says what is wrong."""
    scheme, rest = url.split("://", 1)
    rest, _, query = rest.partition("?")
    userinfo, _, hostpath = rest.rpartition("@")
    netloc, _, path = hostpath.partition("/")
    username, _, password = userinfo.partition(":")
    sentinels = []
    for part in netloc.split(","):
        match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(?::(\d{1,5}))?", part)
        if not match:
            raise ValueError(f"{part!r} is not a sentinel host[:port]")
        port = int(match.group(2) or SENTINEL_DEFAULT_PORT)
        if not 0 < port < 65_536:
            raise ValueError(f"sentinel port {port} is out of range")
        sentinels.append((match.group(1).strip("[]"), port))
    service, _, db = path.partition("/")
    if not re.fullmatch(r"[A-Za-z0-9_.:-]+", service):
        raise ValueError("the path must name the Sentinel service: /service[/db]")
    if db and not re.fullmatch(r"\d{1,5}", db.rstrip("/")):
        raise ValueError(f"database {db!r} is not a number")
    return SentinelURL(sentinels, service, int(db.rstrip("/") or 0), unquote(username), unquote(password),
                       scheme == "rediss+sentinel", query)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


_USERINFO = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@]*):(?P<password>.*)@(?P<tail>[^@]*)$")


def redact_url(url: str) -> str:
    """The URL with any password replaced by '***', for logs and status output.

    Matched on the raw text (up to the last '@'), so a password holding '#', '?' or '/' is hidden too: kombu's
    ``maybe_sanitize_url`` parses the URL first and raises on such a password.
    """
    return _USERINFO.sub(r"\g<head>:***@\g<tail>", url)
