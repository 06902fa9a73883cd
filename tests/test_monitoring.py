"""The operators' monitoring, end to end: a real Prometheus and Alertmanager, the shipped rules and dashboard.

Prometheus runs the shipped rule file (docs/prometheus/late-observer-rules.yml) with only its `for:`
durations shortened (FOR below; every expression as shipped) and the shipped config
(deploy/prometheus/prometheus.yml) with only its intervals (1 s), targets (the workers as static targets, as it
documents for hosts) and its Alertmanager's address changed. Alertmanager runs the shipped
deploy/alertmanager/alertmanager.yml with only its two receivers' URLs (a webhook in this process, /page and
/ticket) and its group timings changed: routes and inhibitions as shipped. Prometheus scrapes two real workers,
whose data Redis is a private redis-server this test stops (the broker is RabbitMQ, so a Redis outage leaves the
workers running). A demo-like load runs throughout: plans at LOAD_RATE/s observed early and late, the demo's
HeatBridge writing heat for 90% of them.

Each fault must bring its alerts to FIRING in Prometheus and to the webhook through Alertmanager, and resolve
once the fault ends, with no other alert firing meanwhile; at the end every panel query of the shipped Grafana
dashboard must answer against that Prometheus with a non-empty, correctly labelled result (last, so that a panel
waiting for a family the collector does not export yet does not hide the faults' results):

| fault | alerts |
|---|---|
| a flood past MAX_INFLIGHT | P28LateObsSaturationSustained |
| the wake listeners' connections killed repeatedly | P28LateObsWakeDegraded |
| one of the two workers stopped | P28LateObsWorkerDown (that instance) |
| every worker stopped | P28LateObsWorkersDown |
| Redis stopped, then restarted | P28MetricsRedisDown, then P28LateObsRedisError |
| calls with an empty plan id | P28ObserveRefusedInput (a ticket) |

Each alert must arrive at the receiver its severity routes to (critical: page, warning: ticket). Two more tests
bring the faults of issue 26 (each on a stack of its own):

- a BUSY spell: a script runs 7 s past Redis's 5 s limit on the data Redis, with the Redis broker on the same
  server and with RabbitMQ: P28LateObsRedisError; never P28LateObsSaturationSustained or
  P28LateObsTimingTooShort (not even pending);
- every worker SIGKILLed until calls are refused with cause backlog (far longer than MAX_WAIT_MS), then
  restarted, a standalone exporter serving meanwhile: P28LateObsWorkersDown, P28LateObsBacklog and
  P28ObserveRefusedOutage{cause="backlog"} (the last two held back by Alertmanager while the first fires), all
  resolving; never saturation or timing (not even pending).

Both depend on the core of issue 24/26 (the backlog gauge, refusals with cause backlog, gaps, plans of a spell
decided redis_error, workers that survive BUSY): they fail, not skip, until it is there.

Two of the checklist's expressions average over a window (`rate(...[10m])`, `[5m]`) and stay true for
that long after the fault by design. Rather than wait 10 minutes, the test fast-forwards that window once
the fault is over: it deletes the fault's samples of that one series through Prometheus's admin API, which
is what the window would have forgotten by then, and the alert then resolves as it would 10 minutes later.

Each alert's times to fire and resolve are printed (`pytest -s`). Without prometheus or
prometheus-alertmanager on PATH (Debian packages of those names) the test skips, and fails when CI is set.
Ports: TEST_PORT_BASE + 1..13 when it is set (tests/conftest.py), else free ports.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from observer_tasks import observe, observe_late
from observer_tasks.core import contract as C
from observer_tasks.core.connections import redis_client
from observer_tasks.core.settings import LATE_POINT, Settings
from observer_tasks.ops.demo import SYMBOLS, HeatBridge, heat_fields

from .conftest import ROOT, PrivateRedis, Worker, counters, lease, poll, server_port

RULES = ROOT / "docs" / "prometheus" / "late-observer-rules.yml"
SCRAPE_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERTMANAGER_CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
DASHBOARD = ROOT / "docs" / "grafana" / "late-observer.json"
JOB = "late-observer"

#: The test's `for:` durations (the shipped ones are minutes). WorkerDown's is the longest on purpose: while
#: every worker is down each instance is down too, and its warning should not fire before the workers are back.
FOR = {
    "P28LateObsSaturationSustained": "4s",
    "P28LateObsTimingTooShort": "4s",
    "P28LateObsRedisError": "3s",
    "P28MetricsRedisDown": "3s",
    "P28LateObsWorkersDown": "3s",
    "P28LateObsWorkerDown": "30s",
    "P28LateObsWakeDegraded": "6s",
    "P28ObserveRefusedOutage": "2s",
    "P28ObserveRefusedConfig": "2s",
    "P28ObserveRefusedInput": "2s",
    "P28LateObsBacklog": "20s",  # longer than WorkersDown's 3 s + its 10 s heartbeat test (as shipped: 3m, 2m)
}
#: Where Alertmanager sends each severity (deploy/alertmanager/alertmanager.yml's routes).
RECEIVER_OF = {"critical": "page", "warning": "ticket"}
SCRAPE_S = 1
LOAD_RATE = 10.0
#: Admission bound of this test's apply layer: the flood goes past it; the load alone does not, even while every
#: worker is down (a lease holds its slot until deadline + grace: LOAD_RATE x 7 s).
MAX_INFLIGHT = 100
#: The observation window (the default) and HeatBridge's answer to the flood's plans, inside it.
MAX_WAIT_MS = 2000
FLOOD_HEAT_S = 1.5
#: Ports, as offsets from TEST_PORT_BASE.
PROMETHEUS, ALERTMANAGER, WEBHOOK, REDIS, WORKER_A, WORKER_B, EXPORTER = 1, 2, 3, 4, 11, 12, 13
#: The BUSY spell: a script runs past Redis's 5 s limit (busy-reply-threshold, left at its default) for BUSY_S more.
BUSY_LIMIT_S, BUSY_S = 5, 7


def binary(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not on PATH (Debian: apt-get install -y {package})"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI is set, so the monitoring must be checked")
        pytest.skip(message)
    return path


def get_json(url: str, timeout: float = 5) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


# -- Grafana's variables -------------------------------------------------------------------------------

#: Grafana's interval rounding (kbn.roundInterval): below each bound (ms), the interval it rounds to (ms).
_ROUND_MS = [(15, 10), (35, 20), (75, 50), (150, 100), (350, 200), (750, 500), (1500, 1000), (3500, 2000),
             (7500, 5000), (12500, 10000), (17500, 15000), (25000, 20000), (45000, 30000), (90000, 60000),
             (210000, 120000), (450000, 300000), (1050000, 600000), (2100000, 900000), (4500000, 1800000)]


def grafana_interval_ms(range_s: float, scrape_s: float, max_data_points: int = 1000) -> int:
    """$__interval as Grafana computes it: the range over the panel's data points, rounded, at least the
    data source's scrape interval."""
    raw = range_s * 1000 / max_data_points
    rounded = next((to for below, to in _ROUND_MS if raw < below), 3600000)
    return int(max(rounded, scrape_s * 1000))


def grafana_expand(expr: str, range_s: float, scrape_s: float) -> str:
    """The query Grafana sends for expr: its built-in variables substituted. $__rate_interval is
    max($__interval + scrape interval, 4 x scrape interval). An unknown variable fails the test."""
    interval_ms = grafana_interval_ms(range_s, scrape_s)
    rate_ms = max(interval_ms + scrape_s * 1000, 4 * scrape_s * 1000)
    values = {"__interval": f"{interval_ms}ms", "__interval_ms": str(interval_ms),
              "__rate_interval": f"{int(rate_ms)}ms", "__rate_interval_ms": str(int(rate_ms)),
              "__range": f"{int(range_s)}s", "__range_s": str(int(range_s)), "__range_ms": str(int(range_s * 1000))}

    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        assert name in values, f"{expr}: Grafana variable ${name} is not one this test knows how to expand"
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, expr)


def dashboard_range_s(dash: dict[str, Any]) -> float:
    m = re.fullmatch(r"now-(\d+)([smhd])", dash["time"]["from"])
    assert m and dash["time"]["to"] == "now", dash["time"]
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def test_grafana_variables_expand_as_grafana_does() -> None:
    # 6 h over 1000 points is 21.6 s, rounded to 20 s; plus one 15 s scrape is 35 s, under 4 scrapes: 60 s.
    assert grafana_expand("rate(x[$__rate_interval])", 6 * 3600, 15) == "rate(x[60000ms])"
    # With 1 s scrapes the interval term wins: 20 s + 1 s. And 24 h: 86.4 s rounds to 1 m, + 15 s.
    assert grafana_expand("rate(x[$__rate_interval])", 6 * 3600, 1) == "rate(x[21000ms])"
    assert grafana_expand("rate(x[$__rate_interval])", 24 * 3600, 15) == "rate(x[75000ms])"
    # 1 h: 3.6 s rounds to 5 s, below a 15 s scrape interval: 15 s, and 4 scrapes (60 s) for rates.
    assert grafana_expand("rate(x[$__interval]) + $__interval_ms", 3600, 15) == "rate(x[15000ms]) + 15000"
    assert grafana_expand("increase(x[$__rate_interval])", 3600, 15) == "increase(x[60000ms])"
    assert grafana_expand("increase(x[${__range}])", 3600, 1) == "increase(x[3600s])"
    with pytest.raises(AssertionError, match="not one this test knows"):
        grafana_expand("rate(x[$bogus])", 3600, 15)


# -- the label domains the collector exports ----------------------------------------------------------------

#: Every value each label takes on /metrics (zero-initialised series), so a `sum by` answers with all of them.
DOMAINS = {"obs_point": set(Settings().obs_points), "reason": set(C.REASONS), "heat_found": {"0", "1"},
           "path": set(C.RECORD_PATHS), "cause": set(C.REFUSAL_CAUSES)}


def check_panel(title: str, target: dict[str, Any], result: list[dict[str, Any]], instances: set[str]) -> str:
    """'' when the query's answer is what the panel needs, else why not."""
    expr = target["expr"]
    if not result:
        return f"{title} [{target['refId']}]: no series for {expr}"
    legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
    outer_by = re.match(r"^(?:[\d.]+ \* )?sum by \(([^)]*)\)", expr)
    for series in result:
        labels, value = series["metric"], float(series["value"][1])
        if not math.isfinite(value):
            return f"{title} [{target['refId']}]: {labels} = {value} for {expr}"
        missing = [name for name in legend if not labels.get(name)]
        if missing:
            return f"{title} [{target['refId']}]: legend labels {missing} missing from {labels}"
        for name, allowed in (*DOMAINS.items(), ("instance", instances)):
            if name in labels and labels[name] not in allowed:
                return f"{title} [{target['refId']}]: {name}={labels[name]!r} is not one of {sorted(allowed)}"
        if "max without(instance)" in expr and "instance" in labels:
            return f"{title} [{target['refId']}]: the instance label survived the dedupe: {labels}"
    if outer_by:
        names = [n.strip() for n in outer_by.group(1).split(",")]
        got = {tuple(s["metric"].get(n, "") for n in names) for s in result}
        if any(set(s["metric"]) != set(names) for s in result):
            return f"{title} [{target['refId']}]: labels {[s['metric'] for s in result]} are not exactly {names}"
        domains = [DOMAINS[n] for n in names if n in DOMAINS]
        if len(domains) == len(names):
            want = {tuple(v) for v in _product(domains)}
            if got != want:
                return f"{title} [{target['refId']}]: series {sorted(got)} are not every {names}: {sorted(want)}"
    return ""


def test_the_panel_check_catches_renamed_metrics_labels_and_values() -> None:
    target = {"refId": "A", "expr": 'sum by (reason) (max without(instance) (rate(p28_heat_reason_total[5m])))',
              "legendFormat": "{{reason}}"}
    good = [{"metric": {"reason": r}, "value": [0, "0.5"]} for r in C.REASONS]
    assert check_panel("t", target, good, set()) == ""
    assert "no series" in check_panel("t", target, [], set())
    unlabelled = [{"metric": {"cause": "x"}, "value": [0, "1"]}]
    assert "legend labels ['reason']" in check_panel("t", target, unlabelled, set())
    renamed = [*good[1:], {"metric": {"reason": "time_out"}, "value": [0, "1"]}]
    assert "is not one of" in check_panel("t", target, renamed, set())
    assert "are not every" in check_panel("t", target, good[1:], set())
    assert "= nan" in check_panel("t", target, [*good[1:], {"metric": {"reason": "ok"}, "value": [0, "NaN"]}], set())
    leaked = {"refId": "A", "expr": "max without(instance) (p28_late_obs_inflight)", "legendFormat": "in flight"}
    assert "instance label survived" in check_panel("t", leaked, [{"metric": {"instance": "w:1"}, "value": [0, "1"]}],
                                                    {"w:1"})


def _product(domains: list[set[str]]) -> list[list[str]]:
    out: list[list[str]] = [[]]
    for d in domains:
        out = [prefix + [v] for prefix in out for v in sorted(d)]
    return out


# -- the pieces the test runs ---------------------------------------------------------------------------------


@dataclass
class Delivery:
    at: float
    alertname: str
    status: str
    labels: dict[str, str]
    receiver: str = ""


class Webhook(ThreadingHTTPServer):
    """Alertmanager's webhook receiver: records every alert of every notification, with its arrival time."""

    daemon_threads = True

    def __init__(self, port: int) -> None:
        self.deliveries: list[Delivery] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", port), _Hook)

    def since(self, t0: float) -> list[Delivery]:
        with self.lock:
            return [d for d in self.deliveries if d.at >= t0]


class _Hook(BaseHTTPRequestHandler):
    server: Webhook

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        now = time.monotonic()
        receiver = self.path.rstrip("/").rsplit("/", 1)[-1]  # /page or /ticket: the route that sent it
        with self.server.lock:
            for alert in body["alerts"]:
                self.server.deliveries.append(Delivery(now, alert["labels"]["alertname"], alert["status"],
                                                       alert["labels"], receiver))
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        pass


class Watch(threading.Thread):
    """Polls Prometheus's /api/v1/alerts every 0.2 s: (time, [(alertname, instance, state)]) snapshots."""

    def __init__(self, url: str) -> None:
        super().__init__(name="alerts-watch", daemon=True)
        self.url = url
        self.snapshots: list[tuple[float, list[tuple[str, str, str]]]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.2):
            with contextlib.suppress(OSError, ValueError):
                alerts = get_json(f"{self.url}/api/v1/alerts", 2)["data"]["alerts"]
                self.snapshots.append((time.monotonic(), [(a["labels"]["alertname"], a["labels"].get("instance", ""),
                                                            a["state"]) for a in alerts]))

    def firing_since(self, t0: float) -> set[str]:
        return {name for t, alerts in list(self.snapshots) if t >= t0 for name, _, state in alerts if state == "firing"}

    def active_since(self, t0: float) -> set[str]:
        """Alerts pending or firing at any snapshot since t0."""
        return {name for t, alerts in list(self.snapshots) if t >= t0 for name, _, _ in alerts}

    def first_firing(self, name: str, t0: float, instance: str | None = None) -> float | None:
        for t, alerts in list(self.snapshots):
            if t >= t0 and any(n == name and s == "firing" and instance in (None, i) for n, i, s in alerts):
                return t
        return None

    def first_clear(self, name: str, t0: float) -> float | None:
        for t, alerts in list(self.snapshots):
            if t >= t0 and not any(n == name for n, _, _ in alerts):
                return t
        return None

    def last(self) -> list[tuple[str, str, str]]:
        return self.snapshots[-1][1] if self.snapshots else [("no snapshot yet", "", "")]


class Server:
    """A server process this test owns (Prometheus, Alertmanager, a standalone exporter), its output in a file."""

    def __init__(self, name: str, argv: list[str], log: Path, ready_url: str,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.log_path = name, log
        self.log = open(log, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=log.parent, env=env)
        poll(lambda: self.proc.poll() is not None or answers(ready_url), 30, 0.1, f"{name} ready")
        assert self.proc.poll() is None, f"{name} exited:\n{log.read_text()[-3000:]}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


class Load(threading.Thread):
    """A demo-like apply layer: LOAD_RATE plans/s, each observed early and late; the demo's HeatBridge writes
    heat for 90% of them after a lognormal delay (median 100 ms), the rest never (they time out)."""

    def __init__(self, bridge: HeatBridge) -> None:
        super().__init__(name="load", daemon=True)
        self.bridge = bridge
        self.rng = random.Random(18)
        self.stopped = threading.Event()
        self.results: dict[str, int] = {}
        self.started = time.monotonic()

    n = 0  # plans sent so far (load-0 .. load-{n-1})

    def run(self) -> None:
        start, n = self.started, 0
        while not self.stopped.wait(max(0.0, start + n / LOAD_RATE - time.monotonic())):
            plan, symbol = f"load-{n}", self.rng.choice(SYMBOLS)
            if self.rng.random() < 0.9:
                delay = self.rng.lognormvariate(math.log(0.1), 0.6)
                self.bridge.schedule(time.monotonic() + delay, plan, heat_fields(self.rng, plan, symbol))
            observe(plan, symbol, "EXECUTE")
            result = observe_late(plan, symbol, "EXECUTE")
            self.results[result] = self.results.get(result, 0) + 1
            n += 1
            self.n = n


SEVERITY = {r["alert"]: r["labels"]["severity"]
            for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}


def rules_with_short_for(path: Path) -> None:
    """The shipped rules with FOR's durations; everything else (expressions, labels, annotations) as shipped."""
    shipped = yaml.safe_load(RULES.read_text())
    for group in shipped["groups"]:
        for rule in group["rules"]:
            assert rule["alert"] in FOR, f"{rule['alert']} is new: give it a short `for:` in FOR and a fault here"
            rule["for"] = FOR[rule["alert"]]
    path.write_text(yaml.safe_dump(shipped, sort_keys=False, width=200))
    ours = {r["alert"]: r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]}
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            assert {**rule, "for": ours[rule["alert"]]["for"]} == ours[rule["alert"]]
    assert set(ours) == set(FOR)


def scrape_config(path: Path, rules: Path, targets: list[str], alertmanager: str) -> None:
    """deploy/prometheus/prometheus.yml with 1 s intervals, our rules, the workers as static targets (as it
    documents for hosts) and our Alertmanager in its `alerting:` block. Only the late-observer job is kept (Flower
    is not run here)."""
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    config["global"].update(scrape_interval=f"{SCRAPE_S}s", evaluation_interval=f"{SCRAPE_S}s",
                            scrape_timeout=f"{SCRAPE_S}s")
    config["rule_files"] = [str(rules)]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == JOB]
    assert "dns_sd_configs" in job
    del job["dns_sd_configs"]
    job["static_configs"] = [{"targets": targets}]
    config["scrape_configs"] = [job]
    (am,) = config["alerting"]["alertmanagers"]
    (static,) = am["static_configs"]
    assert static["targets"] == ["alertmanager:9093"], "the shipped config's Alertmanager moved: adapt this test"
    static["targets"] = [alertmanager]
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def alertmanager_config(path: Path, webhook: str) -> None:
    """deploy/alertmanager/alertmanager.yml with each receiver's URL pointed at webhook/<receiver> and short group
    timings; its routes and inhibitions as shipped."""
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    shipped = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    assert {r["name"] for r in config["receivers"]} == set(RECEIVER_OF.values())
    for receiver in config["receivers"]:
        (hook,) = receiver["webhook_configs"]
        hook["url"] = f"{webhook}/{receiver['name']}"
    config["route"].update(group_wait="200ms", group_interval="1s")
    for route in config["route"].get("routes", []):
        assert not {"group_wait", "group_interval"} & set(route), "a child route's timings: shorten them here too"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    ours = yaml.safe_load(path.read_text())
    for name in ("group_wait", "group_interval"):
        del ours["route"][name], shipped["route"][name]
    for receiver in (*ours["receivers"], *shipped["receivers"]):
        receiver["webhook_configs"][0]["url"] = "-"
    assert ours == shipped, "only the receivers' URLs and the group timings may differ from the shipped file"


@dataclass
class Stack:
    prometheus: str
    alertmanager: str
    watch: Watch
    hook: Webhook
    server: PrivateRedis
    admin: redis.Redis
    bridge: HeatBridge
    workers: dict[str, Worker]
    start_worker: Callable[..., Worker]
    rows: list[tuple[str, str, float, float, float, float]] = field(default_factory=list)

    def query(self, expr: str) -> list[dict[str, Any]]:
        reply = get_json(f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert reply["status"] == "success" and reply["data"]["resultType"] == "vector", reply
        return list(reply["data"]["result"])

    def forget(self, match: str) -> None:
        """Fast-forward the rule's window: delete every sample of `match` up to now (what the window forgets)."""
        url = f"{self.prometheus}/api/v1/admin/tsdb/delete_series?" + urllib.parse.urlencode(
            {"match[]": match, "end": f"{time.time():.3f}"})
        with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=10) as resp:
            assert resp.status == 204

    def quiet(self) -> float:
        """Wait until no alert is pending or firing in Prometheus and none is active in Alertmanager."""
        def calm() -> bool:
            t = time.monotonic()
            recent = [s for s in list(self.watch.snapshots) if s[0] >= t - 1]
            return bool(recent) and not any(alerts for _, alerts in recent) and not get_json(
                f"{self.alertmanager}/api/v2/alerts?active=true")
        poll(calm, 60, 0.2, f"no alert active (Prometheus: {self.watch.last()})")
        return time.monotonic()

    def fired(self, name: str, t0: float, instance: str | None = None, timeout: float = 60) -> tuple[float, float]:
        """Seconds from t0 until `name` was FIRING in Prometheus, and until the webhook had it."""
        prom = poll(lambda: self.watch.first_firing(name, t0, instance), timeout, 0.1,
                    f"{name} firing in Prometheus (now: {self.watch.last()})")
        hook = poll(lambda: next((d for d in self.hook.since(t0) if d.alertname == name and d.status == "firing"
                                  and instance in (None, d.labels.get("instance"))), None), timeout, 0.1,
                    f"{name} delivered by Alertmanager")
        want = RECEIVER_OF[SEVERITY[name]]
        assert hook.receiver == want, f"{name} ({SEVERITY[name]}) went to {hook.receiver}, not {want}"
        return prom - t0, hook.at - t0

    def resolved(self, name: str, t_end: float, timeout: float = 60) -> tuple[float, float]:
        """Seconds from t_end until `name` left Prometheus's active alerts, and until the webhook had it resolved."""
        prom = poll(lambda: self.watch.first_clear(name, t_end), timeout, 0.1, f"{name} resolved in Prometheus")
        hook = poll(lambda: next((d.at for d in self.hook.since(t_end) if d.alertname == name
                                  and d.status == "resolved"), None), timeout, 0.1, f"{name} resolution delivered")
        return prom - t_end, hook - t_end

    def only(self, t0: float, allowed: set[str]) -> None:
        """Since t0 nothing but `allowed` fired in Prometheus or reached the webhook."""
        fired = self.watch.firing_since(t0)
        delivered = {d.alertname for d in self.hook.since(t0) if d.status == "firing"}
        when = [(round(t - t0, 1), a) for t, a in list(self.watch.snapshots) if t >= t0 and a]
        assert fired <= allowed and delivered <= allowed, (
            f"other alerts fired: Prometheus {sorted(fired - allowed)}, delivered {sorted(delivered - allowed)}; "
            f"active alerts (s after start): {when[:40]}")

    def row(self, fault: str, name: str, fire: tuple[float, float], clear: tuple[float, float]) -> None:
        self.rows.append((fault, name, *fire, *clear))


@contextlib.contextmanager
def build_stack(tmp_path: Path, env: dict[str, str], start_worker: Callable[..., Worker], broker: str,
                exporter: bool = False) -> Iterator[Stack]:
    """Prometheus and Alertmanager with the shipped files, two workers on a private data Redis, the demo's
    HeatBridge. broker: "rabbitmq" (the amqp_broker fixture has set CELERY_BROKER_URL) or "redis" (database 1 of
    the private Redis, so a fault of that Redis is the broker's too). exporter: a standalone `observer-tasks
    metrics` in the same job (it serves the counters while no worker runs)."""
    prometheus_bin = binary("prometheus", "prometheus")
    alertmanager_bin = binary("prometheus-alertmanager", "prometheus-alertmanager")
    ports = {n: server_port(n) for n in (PROMETHEUS, ALERTMANAGER, WEBHOOK, REDIS, WORKER_A, WORKER_B, EXPORTER)}
    private = PrivateRedis(tmp_path, ports[REDIS]).start()
    env.update(REDIS_URL=private.url, P28_LATE_OBS_MAX_INFLIGHT=str(MAX_INFLIGHT), P28_METRICS_ADDR="127.0.0.1",
               P28_LATE_OBS_MAX_WAIT_MS=str(MAX_WAIT_MS))
    if broker == "redis":
        env["CELERY_BROKER_URL"] = f"redis://127.0.0.1:{private.port}/1"
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(private.stop)
        hook = Webhook(ports[WEBHOOK])
        cleanup.callback(hook.server_close)
        threading.Thread(target=hook.serve_forever, name="webhook", daemon=True).start()
        cleanup.callback(hook.shutdown)

        def worker(name: str, wait: bool = True) -> Worker:
            return start_worker(metrics_port=ports[WORKER_A if name == "a" else WORKER_B], wait=wait)

        workers = {"a": worker("a"), "b": worker("b")}
        targets = [f"127.0.0.1:{ports[WORKER_A]}", f"127.0.0.1:{ports[WORKER_B]}"]
        if exporter:
            metrics = Server("exporter", [str(Path(sys.executable).with_name("observer-tasks")), "metrics",
                                          "--port", str(ports[EXPORTER])], tmp_path / "exporter.log",
                             f"http://127.0.0.1:{ports[EXPORTER]}/metrics", env={**os.environ, **env})
            cleanup.callback(metrics.stop)
            targets.append(f"127.0.0.1:{ports[EXPORTER]}")
        am_config, rules = tmp_path / "alertmanager.yml", tmp_path / "rules.yml"
        prom_config = tmp_path / "prometheus.yml"
        alertmanager_config(am_config, f"http://127.0.0.1:{ports[WEBHOOK]}/alerts")
        rules_with_short_for(rules)
        scrape_config(prom_config, rules, targets, f"127.0.0.1:{ports[ALERTMANAGER]}")
        am_url, prom_url = f"http://127.0.0.1:{ports[ALERTMANAGER]}", f"http://127.0.0.1:{ports[PROMETHEUS]}"
        am = Server("alertmanager", [alertmanager_bin, f"--config.file={am_config}", f"--storage.path={tmp_path}/am",
                                     f"--web.listen-address=127.0.0.1:{ports[ALERTMANAGER]}",
                                     "--cluster.listen-address="], tmp_path / "alertmanager.log", f"{am_url}/-/ready")
        cleanup.callback(am.stop)
        prom = Server("prometheus", [prometheus_bin, f"--config.file={prom_config}",
                                     f"--storage.tsdb.path={tmp_path}/tsdb", "--web.enable-admin-api",
                                     f"--web.listen-address=127.0.0.1:{ports[PROMETHEUS]}"],
                      tmp_path / "prometheus.log", f"{prom_url}/-/ready")
        cleanup.callback(prom.stop)
        watch = Watch(prom_url)
        watch.start()
        cleanup.callback(watch.stopped.set)
        admin = redis.Redis(port=private.port, socket_timeout=2)
        bridge = HeatBridge(redis_client(private.url, 0.2, "test-heatbridge"),
                            Settings.from_env().heat_lookup_prefix)
        bridge.start()
        cleanup.callback(bridge.stop)
        s = Stack(prom_url, am_url, watch, hook, private, admin, bridge, workers, worker)
        yield s
        if s.rows:
            print(f"\n{'fault':34} {'alert':30} {'firing':>7} {'delivered':>9} {'resolved':>8} {'delivered':>9}")
            for fault, name, *times in s.rows:
                cells = " ".join(f"{t:{w}.1f}" for t, w in zip(times, (7, 9, 8, 9), strict=True))
                print(f"{fault:34} {name:30} {cells}")
            print("(seconds: firing/delivered from the fault's start, resolved/delivered from its end)")


@pytest.fixture
def stack(tmp_path: Path, env: dict[str, str], amqp_broker: str,
          start_worker: Callable[..., Worker]) -> Iterator[Stack]:
    with build_stack(tmp_path, env, start_worker, "rabbitmq") as s:
        yield s


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_alerts_fire_deliver_and_resolve_and_every_panel_answers(stack: Stack, env: dict[str, str]) -> None:
    s = stack
    instances = {f"127.0.0.1:{w.metrics_port}" for w in s.workers.values()}
    load = Load(s.bridge)
    load.start()
    try:
        run_faults(s, instances, load)
    finally:
        load.stopped.set()
        load.join(5)
    print(f"\nload: {load.results}")


def run_faults(s: Stack, instances: set[str], load: Load) -> None:
    # Both targets up and nothing active (right after Prometheus starts, before its first scrapes, "no target
    # answers" is true: the healthy run is watched from there); then a demo-like load for a while.
    poll(lambda: len(s.query(f'up{{job="{JOB}"}} == 1')) == 2, 30, 0.2, "both workers scraped")
    loaded = s.quiet()
    first = s.watch.snapshots[0][0]
    startup = [(t - first, {n for n, _, _ in a}) for t, a in list(s.watch.snapshots) if t < loaded and a]
    print(f"\nstart-up: {set().union(*(n for _, n in startup)) or 'nothing'} active for "
          f"{startup[-1][0] if startup else 0:.1f}s after Prometheus started (its first scrapes)")
    poll(lambda: counters(s.admin)("p28_observed", LATE_POINT, "1") >= 100, 60, 0.2,
         "100 late hits recorded")

    # -- saturation: a flood past MAX_INFLIGHT -------------------------------------------------------------------------
    t0 = s.quiet()
    s.only(loaded, set())  # the healthy load fired nothing
    flood: dict[str, str] = {}
    for plan in (f"flood-{i}" for i in range(3 * MAX_INFLIGHT)):
        flood[plan] = observe_late(plan, "BTCUSDT", "EXECUTE")
        if flood[plan] == "enqueued":  # a slow HeatBridge, within MAX_WAIT_MS: slots held, drops, no timeouts
            s.bridge.schedule(time.monotonic() + FLOOD_HEAT_S, plan, heat_fields(random.Random(plan), plan, "BTCUSDT"))
    dropped = sum(r == "dropped" for r in flood.values())
    assert dropped >= MAX_INFLIGHT, flood
    fire = s.fired("P28LateObsSaturationSustained", t0)
    poll(lambda: int(s.admin.zcard(C.INFLIGHT)) < MAX_INFLIGHT // 2, 30, 0.1, "the flood drained")
    t_end = time.monotonic()
    s.forget("p28_late_obs_dropped_total")  # the [10m] window, 10 minutes on
    s.row(f"flood ({dropped} dropped)", "P28LateObsSaturationSustained", fire,
          s.resolved("P28LateObsSaturationSustained", t_end))
    s.only(t0, {"P28LateObsSaturationSustained"})

    # -- wake degraded: the listeners' connections killed repeatedly ---------------------------------------------------
    t0 = s.quiet()
    killing = threading.Event()
    kills = [0]

    def kill() -> None:
        while not killing.wait(0.02):
            with contextlib.suppress(redis.RedisError):
                kills[0] += int(s.admin.client_kill_filter(_type="pubsub"))
    killer = threading.Thread(target=kill, name="killer", daemon=True)
    killer.start()
    try:
        fire = s.fired("P28LateObsWakeDegraded", t0)
    finally:
        killing.set()
        killer.join(5)
    t_end = time.monotonic()
    s.row(f"wake killed ({kills[0]} kills)", "P28LateObsWakeDegraded", fire,
          s.resolved("P28LateObsWakeDegraded", t_end))
    s.only(t0, {"P28LateObsWakeDegraded"})

    # -- bad input: calls with an empty plan id (a caller's bug: a ticket) ------------------------------------------
    t0 = s.quiet()
    assert {observe_late("", "BTCUSDT", "EXECUTE") for _ in range(5)} == {"error"}
    fire = s.fired("P28ObserveRefusedInput", t0)
    t_end = time.monotonic()
    s.forget('p28_observe_refused_total{cause="invalid_input"}')  # the [15m] window, 15 minutes on
    s.row("calls with an empty plan id", "P28ObserveRefusedInput", fire, s.resolved("P28ObserveRefusedInput", t_end))
    s.only(t0, {"P28ObserveRefusedInput"})

    # -- one of two workers stopped --------------------------------------------------------------------------------
    t0 = s.quiet()
    b = s.workers["b"]
    b.stop()
    fire = s.fired("P28LateObsWorkerDown", t0, instance=f"127.0.0.1:{b.metrics_port}", timeout=90)
    t_end = time.monotonic()
    s.workers["b"] = s.start_worker("b")
    s.row("one of two workers stopped", "P28LateObsWorkerDown", fire, s.resolved("P28LateObsWorkerDown", t_end))
    s.only(t0, {"P28LateObsWorkerDown"})

    # -- every worker stopped -----------------------------------------------------------------------------------------
    t0 = s.quiet()
    for w in s.workers.values():
        os.killpg(w.proc.pid, 15)
    for w in s.workers.values():
        w.stop()
    fire = s.fired("P28LateObsWorkersDown", t0)
    t_end = time.monotonic()
    restarted = {name: s.start_worker(name, wait=False) for name in s.workers}  # both at once
    for name, w in restarted.items():
        s.workers[name] = w.wait_ready()
    back = time.monotonic()
    clear = s.resolved("P28LateObsWorkersDown", t_end)
    s.row("every worker stopped", "P28LateObsWorkersDown", fire, clear)
    # Each instance is down too: its warning may fire only if the outage outlasted its own `for:`.
    outage = back - t0 + 2 * SCRAPE_S
    allowed = {"P28LateObsWorkersDown"} | ({"P28LateObsWorkerDown"} if outage > seconds(FOR["P28LateObsWorkerDown"])
                                           else set())
    s.only(t0, allowed)
    print(f"\nevery worker stopped: {outage:.1f}s without a scraped worker")

    # -- Redis stopped, then back: the exporter's alert, then redis_error ---------------------------------------------
    t0 = s.quiet()
    # Plans in flight when Redis goes (the load alone has one or two at any moment): their looks fail.
    stranded = [f"outage-{i}" for i in range(20)]
    admit(s, stranded)
    s.server.stop()
    fire = s.fired("P28MetricsRedisDown", t0)
    t_back = time.monotonic()
    s.server.start()
    restart_ms = int(s.admin.time()[0]) * 1000
    clear = s.resolved("P28MetricsRedisDown", t_back)
    s.row("Redis stopped", "P28MetricsRedisDown", fire, clear)
    fire = s.fired("P28LateObsRedisError", t_back)

    def admitted_before_restart() -> int:
        leases = [lease(s.admin, p.decode()) for p in s.admin.zrange(C.INFLIGHT, 0, -1)]
        return sum(x is not None and x["published_ms"] < restart_ms for x in leases)
    poll(lambda: admitted_before_restart() == 0, 30, 0.2, "every plan of the outage recorded")
    stream = Settings.from_env().obs_stream
    entries = [{k.decode(): v.decode() for k, v in f.items()} for _, f in s.admin.xrange(stream)]
    ended = {e["plan_id"]: e["heat_reason"] for e in entries
             if e["plan_id"].startswith("outage-") and e["obs_point"] == LATE_POINT}
    assert ended == dict.fromkeys(stranded, "redis_error")
    t_end = time.monotonic()
    s.forget('p28_heat_reason_total{reason="redis_error"}')  # the [5m] window, 5 minutes on
    # The load's calls refused while Redis did not answer (cause unavailable), counted once it answers: the [2m]
    # window of P28ObserveRefusedOutage, 2 minutes on.
    s.forget("p28_observe_refused_total")
    s.row("Redis back (plans of the outage)", "P28LateObsRedisError",
          (fire[0] + t_back - t0, fire[1] + t_back - t0), s.resolved("P28LateObsRedisError", t_end))
    s.only(t0, {"P28MetricsRedisDown", "P28LateObsRedisError", "P28ObserveRefusedOutage"})
    reasons = {k[2]: v for k, v in counters(s.admin).items() if k[:2] == ("p28_heat_reason", LATE_POINT) and v}
    print(f"\npublish_plan_post reasons: {reasons}")
    s.quiet()

    # -- every dashboard panel answers (after the load and every fault above) ------------------------------------------
    dash = json.loads(DASHBOARD.read_text())
    range_s = dashboard_range_s(dash)
    targets = [(p["title"], t) for p in dash["panels"] for t in p["targets"]]

    def problems() -> list[str]:
        out = []
        for title, target in targets:
            expr = grafana_expand(target["expr"], range_s, SCRAPE_S)
            out.append(check_panel(title, {**target, "expr": expr}, s.query(expr), instances))
        return [p for p in out if p]

    last: list[str] = []

    def answered() -> bool:
        nonlocal last
        last = problems()
        return not last

    try:
        poll(answered, 90, 1.0, "every panel answering")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; still: {last}") from None
    print(f"\ndashboard: {len(targets)} queries of {len(dash['panels'])} panels answered after "
          f"{time.monotonic() - load.started:.1f}s of load ({sum(load.results.values())} plans)")
    for title, target in targets:
        n = len(s.query(grafana_expand(target["expr"], range_s, SCRAPE_S)))
        print(f"  {title} [{target['refId']}]: {n} series")


def admit(s: Stack, plans: list[str]) -> None:
    """observe_late each plan and wait until all are in flight. On a loaded machine a call may meet a slow Redis
    and return "deferred": the apply process's thread admits it a moment later."""
    results = {p: observe_late(p, "BTCUSDT", "EXECUTE") for p in plans}
    assert set(results.values()) <= {"enqueued", "deferred"}, results
    poll(lambda: all(s.admin.zscore(C.INFLIGHT, p) is not None for p in plans), 1.5, 0.02, "every plan in flight")


def seconds(duration: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m)", duration)
    assert m, duration
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[m.group(2)]


# -- issue 26's faults, each on a stack of its own ------------------------------------------------------------------


def busy_script(port: int, seconds: float) -> None:
    """A Lua script that runs `seconds` on the Redis at port: past busy-reply-threshold (5 s by default) every other
    client gets BUSY until it ends (the shared-Redis incident of issue 26)."""
    client = redis.Redis(port=port, socket_timeout=seconds + 30)
    client.eval("local t0 = tonumber(redis.call('TIME')[1]) "
                "while tonumber(redis.call('TIME')[1]) - t0 < tonumber(ARGV[1]) do end return 1", 0, str(seconds))
    client.close()


def warm_up(s: Stack, targets: int) -> float:
    poll(lambda: len(s.query(f'up{{job="{JOB}"}} == 1')) == targets, 30, 0.2, f"{targets} targets scraped")
    s.quiet()
    poll(lambda: counters(s.admin)("p28_observed", LATE_POINT, "1") >= 50, 60, 0.2, "50 late hits recorded")
    return s.quiet()


def late_reasons(s: Stack, prefix: str) -> dict[str, str]:
    stream = Settings.from_env().obs_stream
    return {e["plan_id"]: e["heat_reason"] for e in ({k.decode(): v.decode() for k, v in f.items()}
                                                      for _, f in s.admin.xrange(stream))
            if e["plan_id"].startswith(prefix) and e["obs_point"] == LATE_POINT}


@pytest.fixture(params=["redis-broker", "rabbitmq"])
def busy_stack(request: pytest.FixtureRequest, tmp_path: Path, env: dict[str, str],
               start_worker: Callable[..., Worker]) -> Iterator[Stack]:
    if request.param == "rabbitmq":
        request.getfixturevalue("amqp_broker")
    with build_stack(tmp_path, env, start_worker, "rabbitmq" if request.param == "rabbitmq" else "redis") as s:
        yield s


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_busy_spell_pages_as_redis_not_as_capacity_or_timing(busy_stack: Stack) -> None:
    """A script runs BUSY_S past Redis's 5 s limit on the data Redis (the broker too, with the Redis broker) with 20
    plans in flight and the load running: those plans end redis_error, the workers stay up, P28LateObsRedisError
    fires and is paged; the apply layers' deferred calls are replayed after it (drops are likely: MAX_INFLIGHT is
    10 s of load), and neither saturation nor timing goes even pending."""
    s = busy_stack
    load = Load(s.bridge)
    load.start()
    try:
        t0 = warm_up(s, 2)
        spell = [f"busy-{i}" for i in range(20)]
        admit(s, spell)
        dropped_before = counters(s.admin)("p28_late_obs_dropped")
        busy_script(s.server.port, BUSY_LIMIT_S + BUSY_S)
        t_back = time.monotonic()
        fire = s.fired("P28LateObsRedisError", t0, timeout=120)
        poll(lambda: set(late_reasons(s, "busy-")) == set(spell), 60, 0.2, "every plan of the spell recorded")
        assert late_reasons(s, "busy-") == dict.fromkeys(spell, "redis_error")
        dead = [w.output()[-2000:] for w in s.workers.values() if w.proc.poll() is not None]
        assert not dead, f"a worker exited during the spell:\n{dead[0]}"
        t_end = time.monotonic()
        s.forget('p28_heat_reason_total{reason="redis_error"}')  # the [5m] window, 5 minutes on
        s.forget("p28_observe_refused_total")  # the refusals' [2m] window
        s.row(f"BUSY {BUSY_S} s past the limit", "P28LateObsRedisError", fire,
              s.resolved("P28LateObsRedisError", t_end, timeout=90))
        dropped = counters(s.admin)("p28_late_obs_dropped") - dropped_before
        print(f"\nBUSY spell: {dropped} replayed calls dropped; back {t_back - t0:.1f}s after the spell began")
        never = {"P28LateObsSaturationSustained", "P28LateObsTimingTooShort"}
        assert not s.watch.active_since(t0) & never, f"pending or firing: {s.watch.active_since(t0) & never}"
        # Redis's own alerts and the wake path's warning (the listeners reconnect after the spell) may fire too.
        s.only(t0, {"P28LateObsRedisError", "P28MetricsRedisDown", "P28ObserveRefusedOutage", "P28LateObsWakeDegraded"})
    finally:
        load.stopped.set()
        load.join(5)


@pytest.fixture
def exporter_stack(tmp_path: Path, env: dict[str, str], amqp_broker: str,
                   start_worker: Callable[..., Worker]) -> Iterator[Stack]:
    with build_stack(tmp_path, env, start_worker, "rabbitmq", exporter=True) as s:
        yield s


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_worker_killed_past_max_wait_pages_as_workers_down_and_backlog(exporter_stack: Stack) -> None:
    """Both workers SIGKILLed while the load runs and a standalone exporter serves the counters, until calls are
    refused with cause backlog (far longer than MAX_WAIT_MS), then restarted. As docs/runbook.md decides: plans wait,
    then are refused (no drops); WorkersDown pages; the backlog and the refusals fire in Prometheus and Alertmanager
    holds them back; when the workers return the sweeper decides every waiting plan from the heat evidence, every
    alert resolves, and neither saturation nor timing goes even pending."""
    s = exporter_stack
    load = Load(s.bridge)
    load.start()
    try:
        t0 = warm_up(s, 3)
        dropped_before = counters(s.admin)("p28_late_obs_dropped")
        first_plan = load.n
        for w in s.workers.values():
            w.stop(9)
        fire = s.fired("P28LateObsWorkersDown", t0)
        poll(lambda: counters(s.admin)("p28_observe_refused", LATE_POINT, "backlog") > 0, 120, 0.5,
             "calls refused (backlog)")
        for name in ("P28LateObsBacklog", "P28ObserveRefusedOutage"):
            poll(partial(s.watch.first_firing, name, t0), 30, 0.2, f"{name} firing in Prometheus")
        # Alertmanager holds both back while WorkersDown fires: received, suppressed, not delivered.
        def suppressed() -> set[str]:
            return {a["labels"]["alertname"] for a in get_json(f"{s.alertmanager}/api/v2/alerts")
                    if a["status"]["state"] == "suppressed"}
        poll(lambda: {"P28LateObsBacklog", "P28ObserveRefusedOutage"} <= suppressed(), 30, 0.2,
             "the backlog and its refusals held back by Alertmanager")
        held = {d.alertname for d in s.hook.since(t0) if d.status == "firing"}
        assert not held & {"P28LateObsBacklog", "P28ObserveRefusedOutage", "P28LateObsWorkerDown"}, held
        t_end = time.monotonic()
        last_plan = load.n
        restarted = {name: s.start_worker(name, wait=False) for name in s.workers}
        for name, w in restarted.items():
            s.workers[name] = w.wait_ready()
        s.row(f"workers killed {t_end - t0:.0f}s", "P28LateObsWorkersDown", fire,
              s.resolved("P28LateObsWorkersDown", t_end))
        s.row("  its backlog (held back)", "P28LateObsBacklog", (math.nan, math.nan),
              s.resolved("P28LateObsBacklog", t_end))
        s.forget("p28_observe_refused_total")  # the refusals' [2m] window, 2 minutes on
        clear = poll(lambda: s.watch.first_clear("P28ObserveRefusedOutage", t_end), 60, 0.1, "refusals resolved")
        s.row("  its refusals (cause backlog)", "P28ObserveRefusedOutage", (math.nan, math.nan),
              (clear - t_end, math.nan))
        poll(lambda: int(s.admin.zcard(C.INFLIGHT)) < MAX_INFLIGHT // 2, 60, 0.2, "the waiting plans decided")
        assert counters(s.admin)("p28_late_obs_dropped") == dropped_before, "a worker outage drops nothing"
        # Decided from the heat evidence: the load writes heat for 90% of its plans ~100 ms after the call, long
        # before their deadline, so most of the outage's plans are ok, not the sweeper's blanket timeout.
        outage = {p: r for p, r in late_reasons(s, "load-").items() if first_plan <= int(p[5:]) < last_plan}
        share = sum(r == "ok" for r in outage.values()) / max(1, len(outage))
        print(f"\nworker outage: {len(outage)} plans of the outage recorded, {share:.0%} ok")
        assert share > 0.6, f"the outage's plans were not decided from the heat evidence: {share:.0%} ok"
        never = {"P28LateObsSaturationSustained", "P28LateObsTimingTooShort"}
        assert not s.watch.active_since(t0) & never, f"pending or firing: {s.watch.active_since(t0) & never}"
        s.only(t0, {"P28LateObsWorkersDown", "P28LateObsWorkerDown", "P28LateObsBacklog", "P28ObserveRefusedOutage"})
    finally:
        load.stopped.set()
        load.join(5)
