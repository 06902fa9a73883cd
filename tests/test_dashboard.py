"""The Grafana dashboard: the checklist's panels with their queries (each rate deduplicated across the
scraped workers, otherwise verbatim), the wake and liveness panels, only metrics the collector exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from observer_tasks.core import contract as C
from observer_tasks.core.settings import Settings
from observer_tasks.worker.metrics import RedisCollector
from tests.test_rules_promtool import dedupe, rules

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana" / "late-observer.json"

#: The deployment checklist's panels, title -> query, verbatim (the dashboard holds dedupe(query)).
CHECKLIST_PANELS = {
    "Late Observer Saturation (drops/min)": "60 * rate(p28_late_obs_dropped_total[5m])",
    "Late Observer Outcome Split (publish_plan_post)":
        'sum by (heat_found) (rate(p28_observed_total{obs_point="publish_plan_post"}[5m]))',
    "Coverage Split by obs_point": "sum by (obs_point, heat_found) (rate(p28_observed_total[5m]))",
    "Reason Distribution (Late Observer)":
        'sum by (reason) (rate(p28_heat_reason_total{obs_point="publish_plan_post"}[5m]))',
}


#: The families every worker's /metrics serves (the preamble's list), and their labels.
CONTRACT_FAMILIES = {
    "p28_observed_total": {"obs_point", "heat_found"},
    "p28_heat_reason_total": {"obs_point", "reason"},
    "p28_late_obs_dropped_total": set(),
    "p28_observe_refused_total": {"obs_point", "cause"},
    "p28_late_obs_recovered_total": set(),
    "p28_late_obs_inflight": set(),
    "p28_late_obs_heat_wait_seconds_bucket": {"le"},
    "p28_late_obs_heat_wait_seconds_sum": set(),
    "p28_late_obs_heat_wait_seconds_count": set(),
    "p28_metrics_redis_up": set(),
    "p28_late_obs_recorded_total": {"path"},
    "p28_late_obs_workers": set(),
    "p28_late_obs_wake_workers": set(),
    "p28_late_obs_wake_listeners_up": set(),
    "p28_late_obs_wake_resyncs_total": set(),
    "p28_late_obs_backlog": set(),
    "p28_late_obs_redis_gaps_total": set(),
    "p28_late_obs_lost_total": set(),
    "p28_late_obs_unreplicated_total": {"step"},
}

#: Families the core's rewrite adds (issue 24: the backlog gauge and the Redis gaps counter, zero-initialised). The
#: dashboard may query them before the collector exports them; once it does, move them to CONTRACT_FAMILIES.
PENDING_FAMILIES: dict[str, set[str]] = {}

#: What an empty Redis answers to each command the collector pipelines.
_EMPTY_REPLIES: dict[str, Any] = {"hgetall": {}, "hvals": [], "zcard": 0, "zcount": 0, "hlen": 0, "get": None,
                                  "time": (1_700_000_000, 0)}


class _Pipeline:
    """Stands in for a Redis pipeline over an empty database, so the real collector yields every family."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        assert name in _EMPTY_REPLIES, f"the collector now pipelines {name!r}: add its empty reply here"

        def queue(*args: Any, **kwargs: Any) -> _Pipeline:
            self.calls.append(name)
            return self
        return queue

    def execute(self) -> list[Any]:
        return [_EMPTY_REPLIES[name] for name in self.calls]


class _Client:
    def pipeline(self, transaction: bool = True) -> _Pipeline:
        return _Pipeline()


def exported() -> tuple[set[str], dict[str, set[str]]]:
    """Sample names the collector writes on /metrics, and every label's values."""
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    for family in RedisCollector(Settings(), _Client()).collect():  # type: ignore[arg-type]
        for sample in family.samples:
            names.add(sample.name)
            for k, v in sample.labels.items():
                labels.setdefault(k, set()).add(v)
    return names, labels


@pytest.fixture(scope="module")
def dash() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def exprs(dash: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def test_identity_and_datasource_variable(dash: dict[str, Any]) -> None:
    assert dash["uid"] == "p28-late-observer"
    assert 36 <= dash["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for p in dash["panels"]:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]


def test_checklist_panels_keep_their_queries_deduplicated(dash: dict[str, Any]) -> None:
    by_title = {p["title"]: p for p in dash["panels"]}
    for title, query in CHECKLIST_PANELS.items():
        assert title in by_title, f"missing checklist panel {title!r}"
        assert [t["expr"] for t in by_title[title]["targets"]] == [dedupe(query)]


def test_every_rate_and_global_gauge_is_deduplicated(dash: dict[str, Any]) -> None:
    """Every worker serves the same global values: a bare rate or gauge would show (or sum) one per worker."""
    per_worker = {"p28_metrics_redis_up"}  # whether each exporter reads Redis: per instance on purpose
    for expr in exprs(dash):
        for name in set(re.findall(r"\bp28_\w+", expr)) - per_worker:
            assert re.search(rf"max without\(instance\) \((?:rate|increase)?\(?{name}\b", expr), expr


def test_extra_panels(dash: dict[str, Any]) -> None:
    by_title = {p["title"]: p for p in dash["panels"]}
    inflight = by_title["Plans in flight"]
    assert [t["expr"] for t in inflight["targets"]] == ["max without(instance) (p28_late_obs_inflight)"]
    assert "MAX_INFLIGHT" in inflight["description"]
    quantiles = by_title["Heat wait quantiles (ms)"]
    assert quantiles["fieldConfig"]["defaults"]["unit"] == "ms"
    assert [t["expr"] for t in quantiles["targets"]] == [
        f"1000 * histogram_quantile({q}, sum by (le) "
        f"(max without(instance) (rate(p28_late_obs_heat_wait_seconds_bucket[5m]))))" for q in ("0.5", "0.9", "0.99")]
    by_path = by_title["Recorded by path (look/wake/sweep)"]
    assert [t["expr"] for t in by_path["targets"]] == [
        "sum by (path) (max without(instance) (rate(p28_late_obs_recorded_total[5m])))"]
    wake = " ".join(t["expr"] for t in by_title["Wake listeners up vs workers"]["targets"])
    assert "p28_late_obs_wake_listeners_up" in wake and "p28_late_obs_workers" in wake
    resyncs = " ".join(t["expr"] for t in by_title["Wake resyncs (per 5m)"]["targets"])
    assert "p28_late_obs_wake_resyncs_total" in resyncs
    other = " ".join(exprs(dash))
    assert "p28_late_obs_recovered_total" in other and "p28_observe_refused_total" in other
    backlog = by_title["Backlog: plans past deadline no worker decides"]
    assert [t["expr"] for t in backlog["targets"]] == ["max without(instance) (p28_late_obs_backlog)"]
    gaps = by_title["Redis gaps recorded (per 5m)"]
    assert [t["expr"] for t in gaps["targets"]] == [
        "max without(instance) (increase(p28_late_obs_redis_gaps_total[5m]))"]


def test_collector_exports_the_contract() -> None:
    names, labels = exported()
    assert set(CONTRACT_FAMILIES) <= names, f"not exported: {sorted(set(CONTRACT_FAMILIES) - names)}"
    assert labels["path"] == set(C.RECORD_PATHS) == {"look", "wake", "sweep", "admit"}
    assert labels["obs_point"] == {"create_apply_plan", "reconcile_close_consume", "publish_plan_post"}


def test_queries_use_only_exported_metrics_and_label_values(dash: dict[str, Any]) -> None:
    names, labels = exported()
    contract_labels = set().union(*CONTRACT_FAMILIES.values())
    # Prometheus' own `up` of the job the rules watch (deploy/prometheus/prometheus.yml) is allowed too.
    scraped_jobs = {j for r in rules().values() for j in re.findall(r'job="([^"]+)"', str(r["expr"]))}
    for expr in exprs(dash):
        used = set(re.findall(r"\bp28_\w+", expr))
        own = re.findall(r'\bup\{job="([^"]+)"\}', expr)
        assert used or own, expr
        known = set(CONTRACT_FAMILIES) | set(PENDING_FAMILIES)
        assert used <= known and used <= names | set(PENDING_FAMILIES), f"{expr}: not exported: {sorted(used - names)}"
        assert set(own) <= scraped_jobs, expr
        for label, value in re.findall(r'(\w+)\s*=~?\s*"([^"]*)"', expr):
            if label == "job":
                continue
            assert value in labels.get(label, set()), f"{expr}: {label}={value!r} is never exported"
        for group in re.findall(r"by \(([^)]*)\)", expr):
            for label in (x.strip() for x in group.split(",")):
                assert label in labels and label in contract_labels, f"{expr}: label {label!r} is never exported"


def test_unique_panel_ids_and_no_overlap(dash: dict[str, Any]) -> None:
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))
        assert all(t["refId"] for t in p["targets"])
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
