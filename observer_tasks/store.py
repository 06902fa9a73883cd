"""The observer's Redis state: clients, and the three atomic steps (admit, record, release).

Each step is one Lua script under ``redis_scripts/`` (loadable on its own with
``redis-cli --eval``), called through redis-py's ``Script`` (EVALSHA, loading
the script again after a Redis restart).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import keys as K
from .heat import Heat, cap_debug, entry_fields, read_heat
from .settings import STREAM_MAXLEN, SWEEP_GRACE_MS, Settings

#: Errors that mean "Redis could not be asked", as opposed to a bad reply.
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, OSError)


def redis_client(url: str, timeout_s: float) -> redis.Redis:
    """A client that fails fast: no retries, no backoff, bounded connect and reads.

    redis-py 8 retries three times with exponential backoff by default, and its
    sockets wait forever; the observer must never stall its caller that way.
    """
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        health_check_interval=0,
    )


def _script(client: redis.Redis, name: str) -> Any:
    return client.register_script(files("observer_tasks.redis_scripts").joinpath(name).read_text())


@dataclass
class LeasePayload:
    """What the ledger keeps per admitted plan, so the sweeper can record it."""

    symbol: str
    apply_decision: str
    published_ms: int
    deadline_ms: int

    def dumps(self) -> str:
        return json.dumps(self.__dict__, separators=(",", ":"))

    @classmethod
    def loads(cls, raw: bytes | str | None) -> LeasePayload | None:
        try:
            data = json.loads(raw or "")
            return cls(str(data["symbol"]), str(data["apply_decision"]), int(data["published_ms"]),
                       int(data["deadline_ms"]))
        except (ValueError, TypeError, KeyError):
            return None


class Store:
    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings = settings
        self.client = client
        self.keys = K.Keys.from_settings(settings)
        self._admit = _script(client, "admit.lua")
        self._record = _script(client, "record.lua")
        self._release = _script(client, "release.lua")

    def look(self, plan_id: str) -> tuple[Heat, dict[str, Any]]:
        """One look at the plan's heat hash: what it saw and what to put in debug_json.

        A key of the wrong Redis type is a parse_error; Redis being unreachable is
        reported as debug['lookup_error'] with an empty Heat.
        """
        try:
            raw = self.client.hgetall(self.keys.heat(plan_id))
        except redis.ResponseError as exc:
            return Heat(found=True, reason="parse_error"), {"parse": str(exc)[:80]}
        except REDIS_DOWN as exc:
            return Heat(found=False, reason=""), {"lookup_error": type(exc).__name__}
        return read_heat(raw), {}  # type: ignore[arg-type]

    def admit(self, plan_id: str, payload: LeasePayload) -> str:
        """Take a lease for the plan ('admitted'), or count a drop ('dropped'), or 'duplicate'."""
        lease_end = payload.deadline_ms + SWEEP_GRACE_MS
        result = self._admit(
            keys=[K.INFLIGHT, K.LEASES, K.COUNTERS, self.keys.dedupe(K.OBS_LATE, plan_id)],
            args=[plan_id, int(time.time() * 1000), lease_end, self.settings.late_obs_max_inflight,
                  payload.dumps()],
        )
        return result.decode() if isinstance(result, bytes) else str(result)

    def add_counts(self, counts: dict[str, int]) -> None:
        """Add counts kept while Redis could not be reached (one round trip)."""
        pipe = self.client.pipeline(transaction=False)
        for field, n in counts.items():
            pipe.hincrby(K.COUNTERS, field, n)
        pipe.execute()

    def release(self, plan_id: str) -> None:
        self._release(keys=[K.INFLIGHT, K.LEASES], args=[plan_id])

    def record(
        self,
        *,
        plan_id: str,
        symbol: str,
        obs_point: str,
        heat: Heat,
        reason: str,
        apply_decision: str,
        debug: dict[str, Any],
        extra: dict[str, str] | None = None,
        also_count: tuple[str, ...] = (),
        heat_wait: tuple[str, float] | None = None,
    ) -> bool:
        """Write the observation once; False when this plan and point were already recorded."""
        found = "1" if reason == "ok" else "0"
        counters = [K.Keys.observed_field(obs_point, found), K.Keys.reason_field(obs_point, reason), *also_count]
        fields = entry_fields(
            ts_epoch=time.time(), plan_id=plan_id, symbol=symbol, obs_point=obs_point, heat=heat, reason=reason,
            apply_decision=apply_decision, debug_json=cap_debug({**debug, **heat.debug}, self.settings.max_debug_chars),
            extra=extra,
        )
        bucket, wait_s = heat_wait or ("", 0.0)
        entry_id = self._record(
            keys=[self.keys.dedupe(obs_point, plan_id), self.keys.stream, K.COUNTERS, K.INFLIGHT, K.LEASES,
                  K.HEAT_WAIT],
            args=[plan_id, self.settings.dedupe_ttl_sec, STREAM_MAXLEN, "1" if obs_point == K.OBS_LATE else "0",
                  " ".join(counters), bucket, f"{wait_s:.6f}", *fields],
        )
        return entry_id is not None

    def overdue_leases(self, now_ms: int, limit: int = 100) -> list[tuple[str, LeasePayload | None]]:
        """Leases whose end has passed with no record: the sweeper's work list."""
        plans = [p.decode() for p in self.client.zrangebyscore(K.INFLIGHT, "-inf", now_ms, start=0, num=limit)]
        if not plans:
            return []
        payloads = self.client.hmget(K.LEASES, plans)
        return [(plan, LeasePayload.loads(raw)) for plan, raw in zip(plans, payloads, strict=True)]
