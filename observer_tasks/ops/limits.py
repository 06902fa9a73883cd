"""The limits the running processes use, against each other's and this environment's.

Each apply process writes its limits to contract.PRODUCERS every PRODUCER_REPORT_S (client/background.py), each
worker carries its own in its heartbeat (contract.WORKERS, every HEARTBEAT_S): what they run with, which the
operator's environment (the env file as it is now) need not be, e.g. after an edit without a restart.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from ..core import contract as C
from ..core.settings import Settings
from ..core.timings import PRODUCER_REPORT_S, WORKER_STALE_MS
from .probes import redis_now_ms

#: The limits compared: report field -> (variable, the roles that read it). MAX_INFLIGHT is the admission's, so
#: only the apply layers' matter (a worker reports its own, unused); every other one both sides read.
LIMITS: dict[str, tuple[str, tuple[str, ...]]] = {
    "max_inflight": ("P28_LATE_OBS_MAX_INFLIGHT", ("apply",)),
    "max_wait_ms": ("P28_LATE_OBS_MAX_WAIT_MS", ("apply", "worker")),
    "poll_ms": ("P28_LATE_OBS_POLL_MS", ("apply", "worker")),
    "safety_poll_ms": ("P28_LATE_OBS_SAFETY_POLL_MS", ("apply", "worker")),
    "points": ("P28_HEAT_OBS_POINTS", ("apply", "worker")),
}
#: An apply process that has not reported for three periods is left out (it exited, or cannot reach Redis).
PRODUCER_STALE_MS = int(3 * PRODUCER_REPORT_S * 1000)
ENV = "this environment"


@dataclass(frozen=True)
class Process:
    """One process's limits as text (a limit it does not read or report: None), and its report's age (ms)."""

    name: str
    role: str  # apply | worker | env
    age_ms: int | None
    values: dict[str, str | None]


def text(value: Any) -> str | None:
    if value is None:
        return None
    return ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def of(name: str, role: str, age_ms: int | None, report: Mapping[str, Any]) -> Process:
    return Process(name, role, age_ms, {key: text(report.get(key)) if role in roles else None
                                        for key, (_var, roles) in LIMITS.items()})


def of_env(settings: Settings) -> Process:
    """This environment's limits, as a process started now would run with them."""
    report = {"max_inflight": settings.late_obs_max_inflight, "max_wait_ms": settings.late_obs_max_wait_ms,
              "poll_ms": settings.late_obs_poll_ms, "safety_poll_ms": settings.safety_poll_ms,
              "points": settings.early_points}
    return Process(ENV, "env", None, {key: text(report[key]) for key in LIMITS})


def fresh(raw: Mapping[Any, Any], role: str, now_ms: int, stale_ms: int) -> list[Process]:
    """The entries of a PRODUCERS or WORKERS hash written within ``stale_ms`` (unreadable ones left out)."""
    out = []
    for name, value in sorted(raw.items()):
        try:
            report = json.loads(value)
            age = now_ms - int(report["seen_ms"])
        except (ValueError, TypeError, KeyError):
            continue
        if age <= stale_ms:
            out.append(of(name.decode(errors="replace") if isinstance(name, bytes) else name, role, age, report))
    return out


def running(client: redis.Redis) -> list[Process]:
    """The apply processes and the workers that reported lately, apply processes first."""
    now_ms = redis_now_ms(client)
    return (fresh(client.hgetall(C.PRODUCERS), "apply", now_ms, PRODUCER_STALE_MS)
            + fresh(client.hgetall(C.WORKERS), "worker", now_ms, WORKER_STALE_MS))


def mismatches(processes: Iterable[Process]) -> list[str]:
    """One line per limit whose value differs between the processes that read it (and this environment)."""
    processes = list(processes)
    out = []
    for key, (variable, _roles) in LIMITS.items():
        where: dict[str, list[str]] = {}
        for p in processes:
            value = p.values.get(key)
            if value is not None:
                where.setdefault(value, []).append(p.name if p.role == "env" else f"{p.role} {p.name}")
        if len(where) > 1:
            out.append(f"{variable} differs: " + "; ".join(f"{v} on {', '.join(names)}" for v, names in where.items()))
    return out


def in_force(processes: Iterable[Process], key: str, default: int) -> tuple[int, str]:
    """The value the running apply layers agree on (else this environment's), and where it comes from."""
    values = {v for p in processes if p.role == "apply" and (v := p.values.get(key)) is not None}
    if len(values) == 1:
        return int(next(iter(values))), "the running apply layers'"
    if values:
        return default, f"this environment's; the apply layers differ: {', '.join(sorted(values))}"
    return default, "this environment's; no apply layer has reported"


def rows(processes: Iterable[Process]) -> list[tuple[str, ...]]:
    """status's table: one row per process (its role first), its limits ('-' where it does not read one) and its
    report's age."""
    return [(p.role, p.name, *(p.values.get(key) or "-" for key in LIMITS),
             "-" if p.age_ms is None else f"{p.age_ms / 1000:.1f}s") for p in processes]


HEADERS = ("role", "process", "max_inflight", "max_wait_ms", "poll_ms", "safety_poll_ms", "points", "age")
