"""The alert rules: the checklist's exact expressions, valid for promtool, and passing their unit tests.

promtool comes with Debian's ``prometheus`` package. Without it these tests skip, except when CI is set:
then they fail, so CI cannot pass without checking the rules.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "docs" / "prometheus" / "late-observer-rules.yml"
RULE_TESTS = ROOT / "tests" / "prometheus" / "late-observer-rules.test.yml"

#: The deployment checklist's alerts, verbatim (compared with whitespace collapsed).
CHECKLIST_ALERTS = {
    "P28LateObsSaturationSustained": "sum(rate(p28_late_obs_dropped_total[10m])) > 0.01",
    "P28LateObsTimingTooShort": """
        (
          sum(rate(p28_heat_reason_total{obs_point="publish_plan_post",reason="timeout"}[10m]))
        >
          sum(rate(p28_observed_total{obs_point="publish_plan_post"}[10m])) * 0.5
        )
        and
        (
          sum(rate(p28_observed_total{obs_point="publish_plan_post"}[10m])) > 0.05
        )""",
    "P28LateObsRedisError": 'sum(rate(p28_heat_reason_total{reason="redis_error"}[5m])) > 0',
}


def tool(name: str) -> str:
    """The tool's path; skip without it, or fail when CI is set."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not on PATH (Debian: apt-get install -y prometheus)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI is set, so the rules must be checked")
        pytest.skip(message)
    return path


def rules() -> dict[str, dict[str, object]]:
    return {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}


def squash(text: str) -> str:
    return " ".join(text.split())


def test_checklist_alerts_have_exact_expressions() -> None:
    found = rules()
    for name, expr in CHECKLIST_ALERTS.items():
        assert squash(str(found[name]["expr"])) == squash(expr), name


def test_alerts_carry_severity_runbook_and_anchor() -> None:
    for name, rule in rules().items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name  # type: ignore[index]
        annotations = rule["annotations"]
        assert isinstance(annotations, dict)
        assert {"summary", "description", "runbook", "runbook_url"} <= annotations.keys(), name
        assert annotations["runbook_url"] == f"docs/runbook.md#{name.lower()}"
        assert rule.get("for"), name
    found = rules()
    assert "P28_LATE_OBS_MAX_INFLIGHT first (e.g. 400), then MAX_WORKERS (e.g. 8)" in str(
        found["P28LateObsSaturationSustained"]["annotations"])
    assert "2000 → 3000 → 4000" in str(found["P28LateObsTimingTooShort"]["annotations"])
    assert "do not tune config" in str(found["P28LateObsRedisError"]["annotations"])


def test_promtool_check_rules() -> None:
    result = subprocess.run([tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests() -> None:
    result = subprocess.run([tool("promtool"), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
