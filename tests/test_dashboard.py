"""The Grafana dashboard: the checklist's panels with its exact queries, only metrics the collector exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from observer_tasks.metrics import RedisCollector
from observer_tasks.settings import Settings

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana" / "late-observer.json"

#: The deployment checklist's panels, title -> query, verbatim.
CHECKLIST_PANELS = {
    "Late Observer Saturation (drops/min)": "60 * rate(p28_late_obs_dropped_total[5m])",
    "Late Observer Outcome Split (publish_plan_post)":
        'sum by (heat_found) (rate(p28_observed_total{obs_point="publish_plan_post"}[5m]))',
    "Coverage Split by obs_point": "sum by (obs_point, heat_found) (rate(p28_observed_total[5m]))",
    "Reason Distribution (Late Observer)":
        'sum by (reason) (rate(p28_heat_reason_total{obs_point="publish_plan_post"}[5m]))',
}


class _Pipeline:
    """Stands in for a Redis pipeline holding no counters yet, so the real collector yields every family."""

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: self

    def execute(self) -> list[Any]:
        return [{}, 0, {}]


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


def test_checklist_panels_have_exact_queries(dash: dict[str, Any]) -> None:
    by_title = {p["title"]: p for p in dash["panels"]}
    for title, query in CHECKLIST_PANELS.items():
        assert title in by_title, f"missing checklist panel {title!r}"
        assert [t["expr"] for t in by_title[title]["targets"]] == [query]


def test_extra_panels(dash: dict[str, Any]) -> None:
    by_title = {p["title"]: p for p in dash["panels"]}
    inflight = by_title["Plans in flight"]
    assert [t["expr"] for t in inflight["targets"]] == ["p28_late_obs_inflight"]
    assert "MAX_INFLIGHT" in inflight["description"]
    quantiles = [t["expr"] for t in by_title["Heat wait quantiles"]["targets"]]
    assert quantiles == [f"histogram_quantile({q}, sum by (le) (rate(p28_late_obs_heat_wait_seconds_bucket[5m])))"
                         for q in ("0.5", "0.9", "0.99")]
    other = " ".join(exprs(dash))
    assert "p28_late_obs_recovered_total" in other and "p28_observe_refused_total" in other


def test_queries_use_only_exported_metrics_and_label_values(dash: dict[str, Any]) -> None:
    names, labels = exported()
    assert {"p28_observed_total", "p28_late_obs_dropped_total", "p28_late_obs_heat_wait_seconds_bucket"} <= names
    for expr in exprs(dash):
        used = set(re.findall(r"\bp28_\w+", expr))
        assert used, expr
        assert used <= names, f"{expr}: not exported: {sorted(used - names)}"
        for label, value in re.findall(r'(\w+)\s*=~?\s*"([^"]*)"', expr):
            assert value in labels.get(label, set()), f"{expr}: {label}={value!r} is never exported"
        for group in re.findall(r"by \(([^)]*)\)", expr):
            for label in (x.strip() for x in group.split(",")):
                assert label in labels, f"{expr}: label {label!r} is never exported"


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
