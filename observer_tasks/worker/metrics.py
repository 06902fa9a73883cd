"""Prometheus families read from Redis at scrape time, built once from one table.

The counters live in Redis (contract.COUNTERS) and move in the same step as the stream entry they count, so
/metrics shows global totals for every worker and host, survives restarts, and agrees exactly with the stream.
A late record moves one field per outcome (its point, reason, path and, for a hit, its wait's bucket); every
family below is a sum of those fields (``tally``), so the families agree with each other by construction. A
private CollectorRegistry holds only this collector, so nothing else in the process leaks into the page.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import redis
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ..core import contract as C
from ..core.ledger import heat_wait_buckets
from ..core.settings import LATE_POINT, Settings
from ..core.timings import WORKER_STALE_MS

log = logging.getLogger("observer_tasks.metrics")

#: Exported on every scrape, first: whether the families below could be read from Redis (left out when not).
REDIS_UP = ("p28_metrics_redis_up", "gauge", "1 when the exporter could read the counters from Redis", ())
#: Every family: name (without _total), kind, help, labels. The collector looks its values up in a Tally.
FAMILIES = (
    ("p28_observed", "counter", "Observations recorded", ("obs_point", "heat_found")),
    ("p28_heat_reason", "counter", "Observations by reason", ("obs_point", "reason")),
    ("p28_observe_refused", "counter", "observe/observe_late calls refused, by cause", ("obs_point", "cause")),
    ("p28_late_obs_dropped", "counter", "Plans refused because MAX_INFLIGHT plans were in flight", ()),
    ("p28_late_obs_lost", "counter", "Admitted plans whose lease vanished unrecorded (a Redis failover to a replica "
     "that had not received it)", ()),
    ("p28_late_obs_unreplicated", "counter", "Admissions and records no replica acknowledged within "
     "P28_REPLICA_WAIT_MS", ("step",)),
    ("p28_late_obs_recovered", "counter", "Plans decided by the sweeper (no record by deadline + grace)", ()),
    ("p28_late_obs_recorded", "counter", "publish_plan_post entries by who recorded them", ("path",)),
    ("p28_late_obs_wake_resyncs", "counter", "Wake listener resyncs after a (re)connect", ()),
    ("p28_late_obs_redis_gaps", "counter", "Windows in which the workers could not reach Redis (outages)", ()),
    ("p28_late_obs_inflight", "gauge", "Plans under late observation (leases not yet recorded)", ()),
    ("p28_late_obs_backlog", "gauge", "Plans past deadline + sweeper grace not yet decided (workers down or "
     "far behind)", ()),
    ("p28_late_obs_workers", "gauge", "Workers with a fresh heartbeat in Redis", ()),
    ("p28_late_obs_wake_workers", "gauge", "Workers with a fresh heartbeat and the wake path on", ()),
    ("p28_late_obs_wake_listeners_up", "gauge", "Workers whose wake listener is connected", ()),
    ("p28_late_obs_heat_wait_seconds", "histogram", "Time from publish to the observation that found heat (late "
     "hits)", ()),
)


class Tally(NamedTuple):
    """Every family's samples ({labels: value}) and the heat-wait histogram, from the raw counter fields."""

    samples: dict[str, Counter[tuple[str, ...]]]
    buckets: Counter[int]  # upper bound (ms) -> hits in that bucket (not cumulative); -1 for +Inf
    wait_sum_ms: int


def tally(raw: Mapping[str, int], settings: Settings) -> Tally:
    """The families' values from COUNTERS' fields, every configured series present (at 0 where nothing yet)."""
    samples: dict[str, Counter[tuple[str, ...]]] = {name: Counter() for name, kind, *_ in FAMILIES if kind == "counter"}
    for point in settings.obs_points:
        for found in ("0", "1"):
            samples["p28_observed"][(point, found)] += 0
        for reason in C.REASONS:
            samples["p28_heat_reason"][(point, reason)] += 0
        for cause in C.REFUSAL_CAUSES:
            samples["p28_observe_refused"][(point, cause)] += 0
    for step in C.REPLICATED_STEPS:
        samples["p28_late_obs_unreplicated"][(step,)] += 0
    for path in C.RECORD_PATHS:
        samples["p28_late_obs_recorded"][(path,)] += 0
    for name in ("p28_late_obs_dropped", "p28_late_obs_lost", "p28_late_obs_recovered", "p28_late_obs_wake_resyncs",
                 "p28_late_obs_redis_gaps"):
        samples[name][()] += 0
    buckets: Counter[int] = Counter()
    for name, n in raw.items():
        parts = name.split(C.FIELD_SEP)
        if parts[0] == C.REASON and len(parts) >= 3:
            point, reason = parts[1], parts[2]
            samples["p28_observed"][(point, "1" if reason == "ok" else "0")] += n
            samples["p28_heat_reason"][(point, reason)] += n
            if point == LATE_POINT and len(parts) >= 4:
                samples["p28_late_obs_recorded"][(parts[3],)] += n
                if parts[3] == "sweep":
                    samples["p28_late_obs_recovered"][()] += n
                if len(parts) == 5 and parts[4].startswith(C.BUCKET):
                    bound = parts[4][len(C.BUCKET):]
                    buckets[-1 if bound == "+Inf" else int(bound)] += n
        elif parts[0] == C.REFUSED_FIELD and len(parts) == 3:
            samples["p28_observe_refused"][(parts[1], parts[2])] += n
        elif parts[0] == C.UNREPLICATED and len(parts) == 2:
            samples["p28_late_obs_unreplicated"][(parts[1],)] += n
        elif name in (C.DROPPED, C.LOST_FIELD, C.WAKE_RESYNCS, C.GAPS_FIELD):
            family = {C.DROPPED: "p28_late_obs_dropped", C.LOST_FIELD: "p28_late_obs_lost",
                      C.WAKE_RESYNCS: "p28_late_obs_wake_resyncs", C.GAPS_FIELD: "p28_late_obs_redis_gaps"}[name]
            samples[family][()] += n
    return Tally(samples, buckets, int(raw.get(C.WAIT_SUM_MS, 0)))


def read_counters(client: redis.Redis) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in client.hgetall(C.COUNTERS).items()}


class RedisCollector(Collector):
    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings = settings
        self.client = client

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(REDIS_UP[0], REDIS_UP[2])
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.hgetall(C.COUNTERS)
            pipe.zcard(C.INFLIGHT)
            pipe.hvals(C.WORKERS)
            pipe.time()
            raw_counters, inflight, raw_workers, (sec, usec) = pipe.execute()
            now_ms = sec * 1000 + usec // 1000
            pipe = self.client.pipeline(transaction=False)
            pipe.zcount(C.INFLIGHT, "-inf", now_ms)  # leases past their end: nobody decided them yet
            (backlog,) = pipe.execute()
        except (redis.RedisError, OSError) as exc:
            # Leave the counters out rather than show zeros, which Prometheus would read as a reset.
            log.warning("P2.8A metrics: cannot read Redis: %r", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        counts = tally({k.decode(): int(v) for k, v in raw_counters.items()}, self.settings)
        gauges = {"p28_late_obs_inflight": inflight, "p28_late_obs_backlog": backlog,
                  **workers(raw_workers, now_ms)}
        for name, kind, help_text, labels in FAMILIES:
            if kind == "counter":
                family: Any = CounterMetricFamily(name, help_text, labels=list(labels))
                # In the contract's order (tally's: the configured points, then the reasons, causes, paths as the
                # contract lists them), as the operators' checklist shows them; never sorted by label text.
                for values, n in counts.samples[name].items():
                    family.add_metric(list(values), n)
            elif kind == "gauge":
                family = GaugeMetricFamily(name, help_text, value=gauges[name])
            else:
                family = self.histogram(counts)
            yield family

    def histogram(self, counts: Tally) -> Metric:
        (name, _kind, help_text, _labels), = (f for f in FAMILIES if f[1] == "histogram")
        buckets: list[tuple[str, float]] = []
        for bound in heat_wait_buckets(self.settings):
            # Cumulative; counts stored under other bounds (older settings) fall into the first bound above them.
            buckets.append((str(bound / 1000), sum(n for b, n in counts.buckets.items() if 0 <= b <= bound)))
        buckets.append(("+Inf", sum(counts.buckets.values())))
        family = HistogramMetricFamily(name, help_text)
        family.add_metric([], buckets, sum_value=counts.wait_sum_ms / 1000)
        return family


def workers(raw_workers: list[bytes], now_ms: int) -> dict[str, int]:
    """Workers with a fresh heartbeat (Redis time), how many have the wake path on, how many a listener up."""
    alive = waking = listening = 0
    for raw in raw_workers:
        try:
            entry = json.loads(raw)
            fresh = now_ms - int(entry["seen_ms"]) <= WORKER_STALE_MS
        except (ValueError, TypeError, KeyError):
            continue
        alive += fresh
        waking += fresh and entry.get("wake") != "off"
        listening += fresh and entry.get("wake") == "connected"
    return {"p28_late_obs_workers": alive, "p28_late_obs_wake_workers": waking,
            "p28_late_obs_wake_listeners_up": listening}


def registry(settings: Settings, client: redis.Redis) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(RedisCollector(settings, client))
    return reg


def serve(settings: Settings, client: redis.Redis, port: int | None = None) -> Any:
    """Start the /metrics HTTP server in a daemon thread; returns (server, thread)."""
    port = settings.metrics_port if port is None else port
    return start_http_server(port, addr=settings.metrics_addr, registry=registry(settings, client))
