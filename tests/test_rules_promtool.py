"""The alert rules: the checklist's expressions (each rate deduplicated across workers), the liveness
alerts, valid for promtool, and passing their unit tests.

Every worker serves the same global counters (read from Redis) and Prometheus scrapes every worker, so
each rate is wrapped in `max without(instance) (...)`; `dedupe()` applies exactly that wrapping to the
checklist's text, so the comparison still pins the checklist's meaning token for token.

promtool comes with Debian's ``prometheus`` package. Without it these tests skip, except when CI is set:
then they fail, so CI cannot pass without checking the rules.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from tests.conftest import cannot_run

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "docs" / "prometheus" / "late-observer-rules.yml"
RULE_TESTS = ROOT / "tests" / "prometheus" / "late-observer-rules.test.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
#: The one setting every runbook_url is built from: the docs' base URL, shipped as a placeholder.
RUNBOOK_BASE = "https://docs.example.com/observer_tasks"

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


#: Alerts beyond the checklist, with their severity.
OWN_ALERTS = {
    "P28MetricsRedisDown": "critical",
    "P28LateObsWorkersDown": "critical",
    "P28LateObsWorkerDown": "warning",
    "P28LateObsWakeDegraded": "warning",
}

_RATE = re.compile(r"\brate\((p28_\w+(?:\{[^{}]*\})?\[\w+\])\)")


def dedupe(expr: str) -> str:
    """expr with every rate of a p28_ family wrapped in `max without(instance) (...)`."""
    return _RATE.sub(r"max without(instance) (rate(\1))", expr)


def tool(name: str) -> str:
    """The tool's path; skip without it, or fail when CI is set."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not on PATH (Debian: apt-get install -y prometheus)"
        cannot_run(message)
    return path


def rules() -> dict[str, dict[str, object]]:
    return {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}


def squash(text: str) -> str:
    return " ".join(text.split())


def test_checklist_alerts_keep_their_expressions_deduplicated() -> None:
    found = rules()
    for name, expr in CHECKLIST_ALERTS.items():
        assert squash(str(found[name]["expr"])) == squash(dedupe(expr)), name


def test_every_rate_is_deduplicated_across_workers() -> None:
    """A bare sum(rate(...)) over several scraped workers multiplies the global rate by their number."""
    for name, rule in rules().items():
        expr = squash(str(rule["expr"]))
        for match in _RATE.finditer(expr):
            assert expr[:match.start()].endswith("max without(instance) ("), f"{name}: {match.group(0)}"


def test_liveness_alerts() -> None:
    found = rules()
    for name, severity in OWN_ALERTS.items():
        assert found[name]["labels"]["severity"] == severity, name  # type: ignore[index]
    workers_down = squash(str(found["P28LateObsWorkersDown"]["expr"]))
    assert "absent(" in workers_down and "p28_late_obs_workers" in workers_down
    assert squash(str(found["P28LateObsWorkerDown"]["expr"])).startswith("up{")
    wake = squash(str(found["P28LateObsWakeDegraded"]["expr"]))
    assert wake.index("p28_late_obs_wake_listeners_up") < wake.index("<") < wake.index("p28_late_obs_wake_workers")
    assert "POLL_MS" in str(found["P28LateObsWakeDegraded"]["annotations"])


def test_job_in_the_rules_is_the_scraped_job() -> None:
    jobs = {job["job_name"] for job in yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]}
    used = {j for rule in rules().values() for j in re.findall(r'job="([^"]+)"', str(rule["expr"]))}
    assert used and used <= jobs, f"rules select {used - jobs}, which prometheus.yml does not scrape"


def test_runbook_commands_that_return() -> None:
    """Plain XINFO output has no "name:"/"lag:" to grep for; --latency(-history) on a terminal never ends."""
    for name, rule in rules().items():
        text = squash(str(rule["annotations"]))
        assert not re.search(r"redis-cli (?!--raw )[^;|]*\bXINFO\b", text), name
        for m in re.finditer(r"redis-cli [^;|()]*--latency[^;|()]*", text):
            bounded = "--raw" in m.group(0) or text[:m.start()].endswith("timeout ")
            said = "until Ctrl-C" in text[m.start():m.end() + 40]
            assert bounded or said, f"{name}: {m.group(0)} does not return and the runbook does not say so"


def test_unit_tests_cover_every_alert_firing_and_silent() -> None:
    cases = [c for t in yaml.safe_load(RULE_TESTS.read_text())["tests"] for c in t.get("alert_rule_test", [])]
    for name in rules():
        assert any(c["alertname"] == name and c["exp_alerts"] for c in cases), f"{name} never fires in a test"
        assert any(c["alertname"] == name and not c["exp_alerts"] for c in cases), f"{name} never silent"


def test_alerts_carry_severity_runbook_and_anchor() -> None:
    for name, rule in rules().items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name  # type: ignore[index]
        annotations = rule["annotations"]
        assert isinstance(annotations, dict)
        assert {"summary", "description", "runbook", "runbook_url"} <= annotations.keys(), name
        assert annotations["runbook_url"] == f"{RUNBOOK_BASE}/docs/runbook.md#{name.lower()}"
        assert rule.get("for"), name
    found = rules()
    assert "P28_LATE_OBS_MAX_INFLIGHT first (e.g. 400), then MAX_WORKERS (e.g. 8)" in str(
        found["P28LateObsSaturationSustained"]["annotations"])
    assert "2000 → 3000 → 4000" in str(found["P28LateObsTimingTooShort"]["annotations"])
    assert "do not tune config" in str(found["P28LateObsRedisError"]["annotations"])
    assert set(found) == set(CHECKLIST_ALERTS) | set(OWN_ALERTS)


def test_promtool_check_rules() -> None:
    result = subprocess.run([tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests() -> None:
    result = subprocess.run([tool("promtool"), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_runbook_urls_are_absolute_and_open_their_section() -> None:
    """Alertmanager and Grafana open runbook_url as it is: an absolute URL whose anchor is its alert's section."""
    from tests.test_docs import anchors

    sections = anchors(ROOT / "docs" / "runbook.md")
    for name, rule in rules().items():
        url = str(rule["annotations"]["runbook_url"])  # type: ignore[index]
        parts = urlsplit(url)
        assert parts.scheme == "https" and parts.netloc and not parts.query, url
        assert url == url.strip() and not re.search(r"[\s<>\"{}|\\^`]", url), f"{name}: not a valid URL: {url!r}"
        assert parts.path.endswith("/docs/runbook.md"), url
        assert parts.fragment == name.lower() and parts.fragment in sections, f"{name}: no section #{parts.fragment}"


def test_one_substitution_of_the_base_moves_every_runbook_url(tmp_path: Path) -> None:
    """The rules file's documented sed, with another base: every runbook_url follows, the rules still load."""
    header = RULES.read_text().split("groups:", 1)[0]
    assert f"sed 's|{RUNBOOK_BASE}|" in header, "the rules file's header documents the substitution"
    base = "https://git.example.org/quant/observer_tasks/blob/main"
    rendered = tmp_path / "late-observer-rules.yml"
    rendered.write_text(subprocess.run(["sed", f"s|{RUNBOOK_BASE}|{base}|", str(RULES)], capture_output=True,
                                       text=True, check=True).stdout)
    urls = {r["alert"]: r["annotations"]["runbook_url"]
            for g in yaml.safe_load(rendered.read_text())["groups"] for r in g["rules"]}
    assert urls == {name: f"{base}/docs/runbook.md#{name.lower()}" for name in rules()}
    assert RUNBOOK_BASE not in rendered.read_text().split("groups:", 1)[1]
    result = subprocess.run([tool("promtool"), "check", "rules", str(rendered)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
