"""The settings object: every variable, its default and unit, and strict parsing.

Every default lives in the ``Settings`` dataclass below and nowhere else (fixed timings: timings.py). Each
field's metadata names its environment variable, its bounds and its meaning, so ``from_env`` can validate every
value the same way and refuse a bad one with one line that names the variable and the value.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .timings import (
    BROKER_PATIENCE_S,
    LOOKUP_TIMEOUT_S,
    MIN_SWEEP_GRACE_MS,
    MIN_VISIBILITY_TIMEOUT_S,
    RECORD_PATIENCE_S,
)
from .urls import URLError, check_url, is_redis, kombu_broker, redact_url

TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
FALSE_WORDS = frozenset({"false", "0", "no", "off"})
#: P28_LATE_OBS_QUEUE_TYPE's values: RabbitMQ's queue types for late_obs.
QUEUE_TYPES = ("classic", "quorum")
#: The late observation point (fixed by the contract); the early ones are configured (P28_HEAT_OBS_POINTS).
LATE_POINT = "publish_plan_post"
#: An early observation point's name: a label value and part of a dedupe key.
OBS_POINT = re.compile(r"[a-z][a-z0-9_]{0,39}")
#: Most early observation points (each adds 2 + 5 series per family: the metrics' cardinality stays small).
MAX_OBS_POINTS = 8


class SettingsError(ValueError):
    """A variable holds a value the observer refuses; the message is one line."""


def _var(env: str, help: str, *, lo: int | None = None, hi: int | None = None) -> dict[str, Any]:
    return {"env": env, "help": help, "lo": lo, "hi": hi}


@dataclass(frozen=True)
class Settings:
    """Everything the observer reads from the environment, with defaults and units."""

    heat_obs_enabled: bool = field(default=True, metadata=_var("P28_HEAT_OBS_ENABLED", "early observer on/off"))
    heat_obs_points: str = field(
        default="create_apply_plan,reconcile_close_consume",
        metadata=_var("P28_HEAT_OBS_POINTS", f"early observation points, comma-separated (1-{MAX_OBS_POINTS})"))
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
    # 0 means "not set": MAX_WAIT_MS, the only look at the deadline (see safety_poll_ms).
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
        metadata=_var("P28_REPLICA_WAIT_MS", "after admissions (in the apply process's background thread) and "
                      "records, WAIT this long for one replica (ms, 0: off)", lo=0, hi=1000))
    redis_url: str = field(
        default="redis://localhost:6379/0", metadata=_var("REDIS_URL", "Redis holding heat, stream and counters")
    )
    # Empty means "not set"; see ``broker``.
    late_obs_broker_url: str = field(
        default="", metadata=_var("P28_LATE_OBS_BROKER_URL", "the observer's Celery broker (first choice)"))
    broker_url: str = field(
        default="", metadata=_var("CELERY_BROKER_URL", "Celery broker, when P28_LATE_OBS_BROKER_URL is not set"))
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
        if kind == "quorum" and self.broker_is_redis:
            raise SettingsError(f"P28_LATE_OBS_QUEUE_TYPE=quorum needs a RabbitMQ broker, not {self.broker_shown!r}")
        points = self.heat_obs_points.split(",")
        bad = [p for p in points if not OBS_POINT.fullmatch(p) or p == LATE_POINT]
        if bad or not 0 < len(points) <= MAX_OBS_POINTS or len(set(points)) != len(points):
            raise SettingsError(f"P28_HEAT_OBS_POINTS={self.heat_obs_points!r} must be 1-{MAX_OBS_POINTS} distinct "
                                f"names of a-z 0-9 _ (starting with a letter, not {LATE_POINT}), comma-separated")

    @property
    def early_points(self) -> tuple[str, ...]:
        """The early observation points, in the configured order (the first is observe()'s default)."""
        return tuple(self.heat_obs_points.split(","))

    @property
    def obs_points(self) -> tuple[str, ...]:
        """Every observation point: the early ones, then publish_plan_post."""
        return (*self.early_points, LATE_POINT)

    @property
    def safety_poll_ms(self) -> int:
        """The chain's interval while the wake path is healthy (ms). Unset: MAX_WAIT_MS, so a plan's one look is
        at its deadline: the wake step records its heat the moment it is written, the admission heat written
        before the call, and a listener's resync after any reconnect heat written while it was away, so a look
        before the deadline would only find the plan waiting (docs/performance.md: one message per plan)."""
        return self.late_obs_safety_poll_ms or self.late_obs_max_wait_ms

    @property
    def sweep_grace_ms(self) -> int:
        """How long past its deadline a plan waits for its deciding look before the sweeper decides it (ms).

        Covers a final look that runs one POLL_MS late and its lookup (the sweeper decides by the same rule as a
        look: the heat, and the Redis gaps the workers recorded, so a race between the two changes nothing), and
        the apply process's note that a plan's first message never reached the broker, written BROKER_PATIENCE_S
        after the call (the sweep reads it: `missing`, not `timeout`), with a second to spare."""
        note_ms = int(1000 * BROKER_PATIENCE_S) + 1000 - self.late_obs_max_wait_ms
        return max(MIN_SWEEP_GRACE_MS, self.late_obs_poll_ms + int(1000 * LOOKUP_TIMEOUT_S), note_ms)

    @property
    def visibility_timeout_s(self) -> int:
        """The Redis broker's visibility timeout (s): longer than any message is legitimately unacked.

        A countdown message stays unacked in the worker until its ETA (at most the longer poll interval)
        and then runs (lookups plus the record patience); a shorter timeout would redeliver live messages.
        """
        held_ms = max(self.late_obs_poll_ms, self.safety_poll_ms) + 1000 * (2 * LOOKUP_TIMEOUT_S + RECORD_PATIENCE_S)
        return max(MIN_VISIBILITY_TIMEOUT_S, int(held_ms / 1000) + 10)

    def broker_choices(self) -> dict[str, str]:
        """The variables the broker is read from, in their order of precedence, with their values ('': not set)."""
        return {"P28_LATE_OBS_BROKER_URL": self.late_obs_broker_url, "CELERY_BROKER_URL": self.broker_url,
                "REDIS_URL": self.redis_url}

    @property
    def broker(self) -> str:
        """The observer's broker: P28_LATE_OBS_BROKER_URL, else CELERY_BROKER_URL, else REDIS_URL."""
        return self.broker_choices()[self.broker_source]

    @property
    def broker_source(self) -> str:
        """Which variable the broker comes from: the first set of broker_choices."""
        return next(name for name, url in self.broker_choices().items() if url)

    @property
    def broker_shown(self) -> str:
        return redact_url(self.broker)

    @property
    def broker_is_redis(self) -> bool:
        return is_redis(self.broker)

    def celery_broker(self) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
        """The broker as kombu takes it: (URL, transport options to add, ``broker_use_ssl``)."""
        return kombu_broker(self.broker, self.sentinel_auth())

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
            if f.name in ("redis_url", "broker_url", "late_obs_broker_url") and redact:
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
    if env in ("REDIS_URL", "CELERY_BROKER_URL", "P28_LATE_OBS_BROKER_URL"):
        try:
            check_url(env, text, broker=env != "REDIS_URL")
        except URLError as exc:
            raise SettingsError(str(exc)) from None
    return text
