"""observer-tasks demo: the whole pipeline on simulated plans, for a bounded time.

Three actors, as in production: a simulated apply layer (this thread) that
publishes plans and calls observe() and observe_late() exactly as the real one
does (observe() at create_apply_plan for every plan, and at the other configured
early points, reconcile_close_consume by default, for its RECONCILE_CLOSE plans);
a simulated HeatBridge (a thread) that writes each plan's heat hash after a
lognormal delay, or never; and a real Celery worker consuming late_obs
(sandbox.py). The report counts only this run's plans, read back from the
observed stream.
"""

from __future__ import annotations

import heapq
import json
import math
import random
import threading
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from statistics import NormalDist
from typing import Any, cast

import click
import redis

from ..client import producer
from ..core.settings import LATE_POINT, Settings
from ..core.timings import SWEEP_INTERVAL_S
from ..core.urls import redact_url
from .broker import broker_error
from .probes import REDIS_ERRORS, connect, heartbeats, load
from .reports import coverage, coverage_table, late_waits, percentiles, reasons, reasons_table
from .sandbox import ensure_worker, point_at, private_redis

PLAN_STREAM = "quantum:stream:apply.plan"
PLAN_STREAM_MAXLEN = 10_000
SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT", "XRPUSDT", "ADAUSDT")
#: The replaced apply layer's decisions; its RECONCILE_CLOSE plans are observed at the other early points too.
RECONCILE = "RECONCILE_CLOSE"
DECISIONS, DECISION_WEIGHTS = ("EXECUTE", "SKIP", "BLOCKED", RECONCILE), (0.6, 0.2, 0.1, 0.1)
#: Spread of HeatBridge's delay (sigma of its logarithm): p99 is about 4x the median.
HEAT_SIGMA = 0.6
#: The simulated heat hashes expire after this (s), as HeatBridge's would.
HEAT_TTL_S = 3600


def production_signs(client: redis.Redis, settings: Settings) -> str | None:
    """Why this Redis looks like one the demo must not write to: a live worker's heartbeat, or plan or
    observation streams holding plans that are not a demo's. None when it looks like a demo's own."""
    live = [b["name"] for b in heartbeats(client) if b.get("fresh")]
    if live:
        return f"a live worker's heartbeat is there ({', '.join(live[:3])})"
    for stream in (PLAN_STREAM, settings.obs_stream):
        for _id, fields in client.xrevrange(stream, count=100):
            plan = fields.get(b"plan_id", b"").decode(errors="replace")
            if not plan.startswith("demo-"):
                return f"{stream} holds plans that are not a demo's (e.g. {plan[:40]!r})"
    return None


class HeatBridge(threading.Thread):
    """Writes each plan's heat hash when its time comes, like HeatBridge would."""

    def __init__(self, client: redis.Redis, heat_prefix: str) -> None:
        super().__init__(name="demo-heatbridge", daemon=True)
        self.client, self.heat_prefix = client, heat_prefix
        self.due: list[tuple[float, str, dict[str, str]]] = []
        self.cond = threading.Condition()
        self.stopping = False
        self.written = self.errors = 0

    def schedule(self, at: float, plan_id: str, fields: dict[str, str]) -> None:
        with self.cond:
            heapq.heappush(self.due, (at, plan_id, fields))
            self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.join(5)

    def run(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and (not self.due or self.due[0][0] > time.monotonic()):
                    self.cond.wait(self.due[0][0] - time.monotonic() if self.due else None)
                if self.stopping:
                    return
                _at, plan_id, fields = heapq.heappop(self.due)
            try:
                record: dict[Any, Any] = {"ts_epoch": f"{time.time():.3f}", **fields}
                pipe = self.client.pipeline(transaction=False)
                pipe.hset(self.heat_prefix + plan_id, mapping=record)
                pipe.expire(self.heat_prefix + plan_id, HEAT_TTL_S)
                pipe.execute()
                self.written += 1
            except REDIS_ERRORS:
                self.errors += 1


def heat_fields(rng: random.Random, plan_id: str, symbol: str) -> dict[str, str]:
    level = rng.choices(("cold", "warm", "hot"), (0.5, 0.3, 0.2))[0]
    score = {"cold": rng.uniform(0, 0.4), "warm": rng.uniform(0.4, 0.7), "hot": rng.uniform(0.7, 1)}[level]
    action = rng.choice(("DOWNGRADE_FULL_TO_PARTIAL", "HOLD_CLOSE")) if level == "hot" else "NONE"
    out_action = {"NONE": "FULL_CLOSE_PROPOSED", "DOWNGRADE_FULL_TO_PARTIAL": "PARTIAL_CLOSE_PROPOSED",
                  "HOLD_CLOSE": "HOLD"}[action]
    return {"symbol": symbol, "plan_id": plan_id, "in_action": "FULL_CLOSE_PROPOSED", "out_action": out_action,
            "heat_level": level, "heat_score": f"{score:.4f}", "heat_action": action,
            "recommended_partial": "0.5" if action == "DOWNGRADE_FULL_TO_PARTIAL" else "",
            "reason": f"{level} heat (score {score:.2f})", "mode": "shadow"}


class Tally:
    """This run's observations, read incrementally from the observed stream."""

    def __init__(self, client: redis.Redis, settings: Settings, prefix: str) -> None:
        self.client, self.stream, self.prefix = client, settings.obs_stream, prefix
        last = client.xrevrange(self.stream, count=1)
        self.last_id = cast(bytes, last[0][0]) if last else b"0-0"
        self.entries: dict[tuple[str, str], dict[str, str]] = {}

    def update(self) -> None:
        while batch := self.client.xrange(self.stream, min=b"(" + self.last_id, count=1000):
            self.last_id = cast(bytes, batch[-1][0])
            for _id, raw in batch:
                e = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in raw.items()}
                if e.get("plan_id", "").startswith(self.prefix):
                    self.entries[(e.get("obs_point", ""), e["plan_id"])] = e

    def late(self) -> list[dict[str, str]]:
        return [e for (point, _), e in self.entries.items() if point == LATE_POINT]


def run(seconds: float, rate: float, heat_median_ms: float, never_share: float, seed: int | None,
        no_worker: bool, as_json: bool, redis_url: str | None = None, broker_url: str | None = None,
        force: bool = False) -> int:
    def say(line: str) -> None:
        click.echo(line, err=as_json)

    rng = random.Random(seed)
    run_id = uuid.uuid4().hex[:8]
    prefix = f"demo-{run_id}-"
    with ExitStack() as stack:
        if redis_url is None:
            private_redis(stack, say)
        else:  # only a URL given on the command line, never one from the environment
            point_at(redis_url, broker_url or redis_url)
        settings = load()
        producer.reset()  # its settings (REDIS_URL, broker) have just changed
        client = connect(settings.redis_url, settings)
        signs = production_signs(client, settings) if redis_url is not None else None
        if signs and not force:
            raise click.ClickException(f"refusing to write demo plans to {redact_url(settings.redis_url)}: {signs}. "
                                       "Run the demo on its own Redis (the default), or add --force")
        error = broker_error(settings)
        if error:
            raise click.ClickException(f"cannot reach the broker at {redact_url(settings.broker)}: {error}")
        ensure_worker(stack, settings, run_id, no_worker, say)
        bridge = HeatBridge(client, settings.heat_lookup_prefix)
        bridge.start()
        stack.callback(bridge.stop)
        tally = Tally(client, settings, prefix)
        say(f"run {run_id}: {rate:g} plans/s for {seconds:g} s on {redact_url(settings.redis_url)}, heat median "
            f"{heat_median_ms:g} ms, never shared {never_share:.0%}, MAX_WAIT_MS={settings.late_obs_max_wait_ms}")
        results = {"early": Counter[str](), "late": Counter[str]()}
        published = publish(rng, rate, seconds, heat_median_ms, never_share, prefix, client, bridge, tally, results,
                            say, settings.early_points)
        drain(settings, tally, results, published, say)
        report = summary(run_id, settings, published, results, tally, heat_median_ms, never_share)
        report["heat_written"], report["heat_write_errors"] = bridge.written, bridge.errors
    if as_json:
        click.echo(json.dumps(report))
    else:
        click.echo(report_text(report))
    if published and not tally.late():
        say("no publish_plan_post observation was recorded: is a worker consuming late_obs with this REDIS_URL?")
        return 1
    return 0


def publish(rng: random.Random, rate: float, seconds: float, heat_median_ms: float, never_share: float,
            prefix: str, client: redis.Redis, bridge: HeatBridge, tally: Tally, results: dict[str, Counter[str]],
            say: Any, points: tuple[str, ...] | None = None) -> int:
    """The simulated apply layer: one plan every 1/rate s for `seconds`; returns how many it published. Every
    plan is observed at the first early point (create_apply_plan), a RECONCILE_CLOSE plan at the others of
    ``points`` too (default: P28_HEAT_OBS_POINTS; results["reconcile"] counts those calls)."""
    points = Settings.from_env().early_points if points is None else points
    reconciled = results.setdefault("reconcile", Counter())
    start = time.monotonic()
    next_report, n = start + 1, 0
    try:
        while (due := start + n / rate) < start + seconds:
            now = time.monotonic()
            if now >= next_report:
                progress(tally, results, n, f"{now - start:3.0f}s", say)
                next_report += 1
            if now < due:
                time.sleep(min(due, next_report) - now)
                continue
            plan_id, symbol = f"{prefix}{n}", rng.choice(SYMBOLS)
            decision = rng.choices(DECISIONS, DECISION_WEIGHTS)[0]
            client.xadd(PLAN_STREAM, {"plan_id": plan_id, "symbol": symbol, "decision": decision},
                        maxlen=PLAN_STREAM_MAXLEN, approximate=True)
            if rng.random() >= never_share:
                delay_s = rng.lognormvariate(math.log(heat_median_ms / 1000), HEAT_SIGMA)
                bridge.schedule(time.monotonic() + delay_s, plan_id, heat_fields(rng, plan_id, symbol))
            results["early"][producer.observe(plan_id, symbol, decision)] += 1
            for point in points[1:] if decision == RECONCILE else ():
                reconciled[producer.observe(plan_id, symbol, decision, obs_point=point)] += 1
            results["late"][producer.observe_late(plan_id, symbol, decision)] += 1
            n += 1
    except KeyboardInterrupt:
        say("interrupted: no more plans; waiting for the ones in flight (Ctrl-C again to stop at once)")
    return n


def drain(settings: Settings, tally: Tally, results: dict[str, Counter[str]], published: int, say: Any) -> None:
    """Wait until every enqueued plan is recorded, at most until the sweeper would have recorded it."""
    start = time.monotonic()
    limit = settings.late_obs_max_wait_ms / 1000 + settings.sweep_grace_ms / 1000 + SWEEP_INTERVAL_S + 3
    next_report = start + 1
    while True:
        tally.update()
        now = time.monotonic()
        if len(tally.late()) >= results["late"]["enqueued"] or now - start > limit:
            progress(tally, results, published, "done", say)
            return
        if now >= next_report:
            progress(tally, results, published, "wait", say)
            next_report += 1
        time.sleep(0.2)


def progress(tally: Tally, results: dict[str, Counter[str]], published: int, stage: str, say: Any) -> None:
    tally.update()
    late = tally.late()
    hits = sum(e.get("heat_found") == "1" for e in late)
    cov = f"{100 * hits / len(late):5.1f}%" if late else "    -"
    say(f"{stage:>4}  published {published:5d}  in flight {results['late']['enqueued'] - len(late):4d}  "
        f"observed {len(late):5d}  coverage {cov}")


def summary(run_id: str, settings: Settings, published: int, results: dict[str, Counter[str]], tally: Tally,
            heat_median_ms: float, never_share: float) -> dict[str, Any]:
    entries = list(tally.entries.values())
    hits, _timeouts = late_waits(entries)
    p = percentiles(hits)
    wait = settings.late_obs_max_wait_ms
    in_time = NormalDist().cdf((math.log(wait) - math.log(heat_median_ms)) / HEAT_SIGMA)
    return {
        "run_id": run_id,
        "redis_url": redact_url(settings.redis_url),
        "published": published,
        "observe": dict(results["early"]),
        "observe_late": dict(results["late"]),
        "observe_reconcile": dict(results.get("reconcile", {})),
        "coverage": coverage(entries, settings.obs_points),
        "reasons": reasons(entries, settings.obs_points),
        "dropped": results["late"]["dropped"],
        "unfinished": results["late"]["enqueued"] - len(tally.late()),
        "latency_ms": {k: p[k] for k in ("p50", "p90", "p99", "max", "n")} if p else None,
        "max_wait_ms": wait,
        "expected_late_coverage_pct": round(100 * (1 - never_share) * in_time, 1),
    }


def report_text(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    latency = (f"p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}  max {lat['max']}  (n={lat['n']})"
               if lat else "no hits")
    calls = ", ".join(f"{k} {v}" for k, v in sorted(r["observe_late"].items()))
    reconciled = sum(r["observe_reconcile"].values())
    return "\n".join([
        "",
        f"run {r['run_id']}: {r['published']} plans published (observe_late: {calls or 'none'}; {RECONCILE} plans "
        f"observed at the other early points too: {reconciled} calls)",
        coverage_table(r["coverage"]),
        f"expected publish_plan_post coverage ~{r['expected_late_coverage_pct']}% "
        f"(heat shared and written within MAX_WAIT_MS={r['max_wait_ms']})",
        "",
        reasons_table(r["reasons"]),
        "",
        f"dropped (MAX_INFLIGHT reached): {r['dropped']}   unfinished at the end: {r['unfinished']}   "
        f"heat hashes written: {r['heat_written']} ({r['heat_write_errors']} failed)",
        f"publish_plan_post hit latency, wait_ms: {latency}",
    ])
