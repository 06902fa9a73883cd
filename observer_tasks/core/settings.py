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
from typing import Any
from urllib.parse import urlsplit

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
#: How often each worker writes its heartbeat and wake-path health to Redis (s).
HEARTBEAT_S = 0.5
#: How long one heartbeat vouches for the wake path (ms): four missed beats and the chain polls at POLL_MS.
WAKE_HEALTH_TTL_MS = 2_000
#: A worker whose heartbeat is older than this is counted as gone (ms).
WORKER_STALE_MS = 10_000
#: A gone worker's heartbeat entry is removed after this (ms).
WORKER_FORGET_MS = 60_000
#: Least visibility timeout of the Redis broker (s): kombu restores a killed worker's messages after it.
MIN_VISIBILITY_TIMEOUT_S = 30
#: The safety interval used when P28_LATE_OBS_SAFETY_POLL_MS is not set (ms), clamped to POLL..MAX_WAIT.
#: Chosen by measurement (docs/performance.md): a third of polling-only's worker CPU, same detection.
DEFAULT_SAFETY_POLL_MS = 1000


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
    redis_url: str = field(
        default="redis://localhost:6379/0", metadata=_var("REDIS_URL", "Redis holding heat, stream and counters")
    )
    # Empty means "the same as REDIS_URL"; see ``broker``.
    broker_url: str = field(default="", metadata=_var("CELERY_BROKER_URL", "Celery broker (default: REDIS_URL)"))
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
        scheme = urlsplit(text).scheme
        # No unix://: kombu has no such transport, so the broker (which defaults to REDIS_URL) could not start.
        allowed = ("redis", "rediss") if env == "REDIS_URL" else ("redis", "rediss", "amqp", "amqps", "pyamqp")
        if scheme not in allowed:
            raise SettingsError(f"{env}={redact_url(text)!r} must be a URL with scheme {'/'.join(allowed)}")
    return text


_USERINFO = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@]*):(?P<password>.*)@(?P<tail>[^@]*)$")


def redact_url(url: str) -> str:
    """The URL with any password replaced by '***', for logs and status output.

    Matched on the raw text (up to the last '@'), so a password holding '#', '?' or '/' is hidden too: kombu's
    ``maybe_sanitize_url`` parses the URL first and raises on such a password.
    """
    return _USERINFO.sub(r"\g<head>:***@\g<tail>", url)
