"""Prometheus families read from Redis at scrape time.

The counters live in Redis and move in the same Lua step as the stream entry
they count, so /metrics shows global totals for every worker and host, survives
restarts, and agrees exactly with the stream. A private CollectorRegistry holds
only this collector, so nothing else in the process leaks into the page.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from . import keys as K
from .settings import Settings
from .store import REDIS_DOWN

log = logging.getLogger("observer_tasks.metrics")


def heat_wait_buckets(settings: Settings) -> list[int]:
    """Upper bounds (ms) around POLL_MS and MAX_WAIT_MS, so MAX_WAIT_MS can be tuned from data."""
    poll, wait = settings.late_obs_poll_ms, settings.late_obs_max_wait_ms
    bounds = {poll, 2 * poll, 5 * poll, *(int(wait * f) for f in (0.125, 0.25, 0.5, 0.75, 1.0, 1.25))}
    return sorted(b for b in bounds if 0 < b <= wait * 1.25)


def heat_wait_bucket(settings: Settings, wait_ms: int) -> str:
    """The histogram field a late hit of wait_ms is counted under ('le:<ms>' or 'le:+Inf')."""
    for bound in heat_wait_buckets(settings):
        if wait_ms <= bound:
            return f"le:{bound}"
    return "le:+Inf"


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
            raw_counters, inflight, raw_hist = pipe.execute()
        except (*REDIS_DOWN, redis.RedisError) as exc:
            # Leave the counters out rather than show zeros, which Prometheus would read as a reset.
            log.warning("P2.8A metrics: cannot read Redis: %r", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from self.families({k.decode(): int(v) for k, v in raw_counters.items()}, inflight,
                                 {k.decode(): v.decode() for k, v in raw_hist.items()})

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
                                  value=counts.get("dropped", 0))
        yield CounterMetricFamily("p28_late_obs_recovered", "Plans recorded by the sweeper (no record by deadline"
                                  " + grace)", value=counts.get("recovered", 0))
        yield GaugeMetricFamily("p28_late_obs_inflight", "Plans under late observation (leases not yet recorded)",
                                value=inflight)
        yield self.histogram(hist)

    def histogram(self, hist: dict[str, str]) -> Metric:
        buckets: list[tuple[str, float]] = []
        stored = {k[3:]: int(v) for k, v in hist.items() if k.startswith("le:") and k != "le:+Inf"}
        for bound in heat_wait_buckets(self.settings):
            # Cumulative; counts stored under other bounds (older settings) fall into the first bound above them.
            buckets.append((str(bound / 1000), sum(n for b, n in stored.items() if int(b) <= bound)))
        buckets.append(("+Inf", int(hist.get("count", 0))))
        family = HistogramMetricFamily("p28_late_obs_heat_wait_seconds",
                                       "Time from publish to the look that found heat (late hits)")
        family.add_metric([], buckets, sum_value=float(hist.get("sum", 0)))
        return family


def registry(settings: Settings, client: redis.Redis) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(RedisCollector(settings, client))
    return reg


def serve(settings: Settings, client: redis.Redis, port: int | None = None) -> Any:
    """Start the /metrics HTTP server in a daemon thread; returns (server, thread)."""
    port = settings.metrics_port if port is None else port
    return start_http_server(port, addr=settings.metrics_addr, registry=registry(settings, client))
