"""Prometheus families read from Redis at scrape time.

The counters live in Redis and move in the same Lua step as the stream entry
they count, so /metrics shows global totals for every worker and host, survives
restarts, and agrees exactly with the stream. A private CollectorRegistry holds
only this collector, so nothing else in the process leaks into the page.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ..core import keys as K
from ..core.settings import WORKER_STALE_MS, Settings
from ..core.store import heat_wait_buckets

log = logging.getLogger("observer_tasks.metrics")


class RedisCollector(Collector):
    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings = settings
        self.client = client

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("p28_metrics_redis_up", "1 when the exporter could read the counters from Redis")
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.hgetall(K.COUNTERS)
            pipe.zcard(K.INFLIGHT)
            pipe.hgetall(K.HEAT_WAIT)
            pipe.hvals(K.WORKERS)
            pipe.time()
            raw_counters, inflight, raw_hist, raw_workers, (sec, usec) = pipe.execute()
        except (redis.RedisError, OSError) as exc:
            # Leave the counters out rather than show zeros, which Prometheus would read as a reset.
            log.warning("P2.8A metrics: cannot read Redis: %r", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from self.families({k.decode(): int(v) for k, v in raw_counters.items()}, inflight,
                                 {k.decode(): v.decode() for k, v in raw_hist.items()})
        yield from self.worker_families(raw_workers, sec * 1000 + usec // 1000)

    def worker_families(self, raw_workers: list[bytes], now_ms: int) -> Iterator[Metric]:
        """Workers with a fresh heartbeat (Redis time), and how many of them have their wake listener up."""
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
        yield GaugeMetricFamily("p28_late_obs_workers", "Workers with a fresh heartbeat in Redis", value=alive)
        yield GaugeMetricFamily("p28_late_obs_wake_workers", "Workers with a fresh heartbeat and the wake path on",
                                value=waking)
        yield GaugeMetricFamily("p28_late_obs_wake_listeners_up", "Workers whose wake listener is connected",
                                value=listening)

    def families(self, counts: dict[str, int], inflight: int, hist: dict[str, str]) -> Iterator[Metric]:
        observed = CounterMetricFamily("p28_observed", "Observations recorded", labels=["obs_point", "heat_found"])
        reasons = CounterMetricFamily("p28_heat_reason", "Observations by reason", labels=["obs_point", "reason"])
        refused = CounterMetricFamily("p28_observe_refused", "observe/observe_late calls refused, by cause",
                                      labels=["obs_point", "cause"])
        for point in K.OBS_POINTS:
            for found in ("0", "1"):
                observed.add_metric([point, found], counts.get(K.Keys.observed_field(point, found), 0))
            for reason in K.REASONS:
                reasons.add_metric([point, reason], counts.get(K.Keys.reason_field(point, reason), 0))
            for cause in K.REFUSAL_CAUSES:
                refused.add_metric([point, cause], counts.get(K.Keys.refused_field(point, cause), 0))
        yield observed
        yield reasons
        yield refused
        yield CounterMetricFamily("p28_late_obs_dropped", "Plans refused because MAX_INFLIGHT plans were in flight",
                                  value=counts.get(K.DROPPED, 0))
        yield CounterMetricFamily("p28_late_obs_lost", "Admitted plans whose lease vanished unrecorded (a Redis"
                                  " failover to a replica that had not received it)", value=counts.get(K.LOST, 0))
        unreplicated = CounterMetricFamily("p28_late_obs_unreplicated", "Admissions and records no replica"
                                           " acknowledged within P28_REPLICA_WAIT_MS", labels=["step"])
        for step in K.REPLICATED_STEPS:
            unreplicated.add_metric([step], counts.get(K.Keys.unreplicated_field(step), 0))
        yield unreplicated
        yield CounterMetricFamily("p28_late_obs_recovered", "Plans recorded by the sweeper (no record by deadline"
                                  " + grace)", value=counts.get(K.RECOVERED, 0))
        recorded = CounterMetricFamily("p28_late_obs_recorded", "publish_plan_post entries by who recorded them",
                                       labels=["path"])
        for path in K.RECORD_PATHS:
            recorded.add_metric([path], counts.get(K.Keys.recorded_field(path), 0))
        yield recorded
        yield CounterMetricFamily("p28_late_obs_wake_resyncs", "Wake listener resyncs after a (re)connect",
                                  value=counts.get(K.WAKE_RESYNCS, 0))
        yield GaugeMetricFamily("p28_late_obs_inflight", "Plans under late observation (leases not yet recorded)",
                                value=inflight)
        yield self.histogram(hist)

    def histogram(self, hist: dict[str, str]) -> Metric:
        buckets: list[tuple[str, float]] = []
        prefix = K.HIST_BUCKET_PREFIX
        stored = {k[len(prefix):]: int(v) for k, v in hist.items() if k.startswith(prefix) and k != prefix + "+Inf"}
        for bound in heat_wait_buckets(self.settings):
            # Cumulative; counts stored under other bounds (older settings) fall into the first bound above them.
            buckets.append((str(bound / 1000), sum(n for b, n in stored.items() if int(b) <= bound)))
        buckets.append(("+Inf", int(hist.get(K.HIST_COUNT, 0))))
        family = HistogramMetricFamily("p28_late_obs_heat_wait_seconds",
                                       "Time from publish to the look that found heat (late hits)")
        family.add_metric([], buckets, sum_value=float(hist.get(K.HIST_SUM, 0)))
        return family


def registry(settings: Settings, client: redis.Redis) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(RedisCollector(settings, client))
    return reg


def serve(settings: Settings, client: redis.Redis, port: int | None = None) -> Any:
    """Start the /metrics HTTP server in a daemon thread; returns (server, thread)."""
    port = settings.metrics_port if port is None else port
    return start_http_server(port, addr=settings.metrics_addr, registry=registry(settings, client))
