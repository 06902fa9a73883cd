"""The alert rules: the checklist's expressions (each rate deduplicated across workers) with their
infrastructure guard, the outage, refusal and liveness alerts, valid for promtool, and passing their unit tests.

Every worker serves the same global counters (read from Redis) and Prometheus scrapes every worker, so
each rate is wrapped in `max without(instance) (...)`; `dedupe()` applies exactly that wrapping to the
checklist's text, so the comparison still pins the checklist's meaning token for token. Saturation and timing
add one guard, `unless on() (<an infrastructure signal>)`, the same text in both: the unit tests' groups named
"fault: <fault>; guarded: <alerts>" show those alerts silent through an outage, and
`test_guards_are_what_keeps_capacity_and_timing_silent` runs the same groups with the guard cut off to show it is
the guard that keeps them silent.

promtool comes with Debian's ``prometheus`` package. Without it these tests skip, except when CI is set:
then they fail, so CI cannot pass without checking the rules.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from observer_tasks.core import contract as C
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


#: Alerts beyond the checklist, with their severity (critical pages, warning makes a ticket:
#: deploy/alertmanager/alertmanager.yml).
OWN_ALERTS = {
    "P28MetricsRedisDown": "critical",
    "P28ObserveRefusedOutage": "critical",
    "P28ObserveRefusedConfig": "critical",
    "P28ObserveRefusedInput": "warning",
    "P28LateObsBacklog": "critical",
    "P28LateObsWorkersDown": "critical",
    "P28LateObsWorkerDown": "warning",
    "P28LateObsWakeDegraded": "warning",
}

#: Capacity and timing: silent while an infrastructure signal explains their drops or timeouts.
GUARDED = ("P28LateObsSaturationSustained", "P28LateObsTimingTooShort")
#: What the guard must look at: a Redis gap, the refusals of an outage, a backlog, no fresh heartbeat, an exporter
#: that cannot read Redis, every scraped worker down.
GUARD_SIGNALS = ("p28_late_obs_redis_gaps_total", 'p28_observe_refused_total{cause=~"unavailable|backlog|given_up"}',
                 "p28_late_obs_backlog", "p28_late_obs_workers", "p28_metrics_redis_up", 'up{job="late-observer"}')

_RATE = re.compile(r"\b(rate|increase)\((p28_\w+(?:\{[^{}]*\})?\[\w+\])\)")


def dedupe(expr: str) -> str:
    """expr with every rate (and increase) of a p28_ family wrapped in `max without(instance) (...)`."""
    return _RATE.sub(r"max without(instance) (\1(\2))", expr)


def guard_of(expr: str) -> str:
    """The `unless on() (...)` clause that ends expr (whitespace collapsed), or ''."""
    squashed = squash(expr)
    i = squashed.rfind(" unless on() (")
    return squashed[i + 1:] if i >= 0 and squashed.endswith(")") else ""


def unguarded(expr: str) -> str:
    """expr without its guard: the checklist's expression alone."""
    guard = guard_of(expr)
    return squash(expr)[:-len(guard)].rstrip() if guard else expr


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
        assert unguarded(str(found[name]["expr"])) == squash(dedupe(expr)), name
        assert bool(guard_of(str(found[name]["expr"]))) == (name in GUARDED), name


def test_capacity_and_timing_share_one_guard_on_every_infrastructure_signal() -> None:
    found = rules()
    guards = {guard_of(str(found[name]["expr"])) for name in GUARDED}
    assert len(guards) == 1, f"the guards differ: {guards}"
    (guard,) = guards
    for signal in GUARD_SIGNALS:
        assert signal in guard, f"the guard does not look at {signal}"
    # Its windows outlast the alerts' 10m windows, so a burst the window still holds stays explained.
    assert set(re.findall(r"\[(\w+):?\]", guard)) == {"15m"}, guard


def test_every_rate_is_deduplicated_across_workers() -> None:
    """A bare sum(rate(...)) over several scraped workers multiplies the global rate by their number."""
    for name, rule in rules().items():
        expr = squash(str(rule["expr"]))
        for match in _RATE.finditer(expr):
            assert expr[:match.start()].endswith("max without(instance) ("), f"{name}: {match.group(0)}"
        assert "sum(rate(" not in expr and "sum(increase(" not in expr, name


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


def test_refusal_alerts_split_the_causes() -> None:
    """Outage causes page as an outage, the configuration's as a configuration error, the caller's as a ticket;
    every cause the code counts is in exactly one of them."""
    found = rules()
    causes = {}
    for name in ("P28ObserveRefusedOutage", "P28ObserveRefusedConfig", "P28ObserveRefusedInput"):
        expr = squash(str(found[name]["expr"]))
        assert "p28_observe_refused_total" in expr and "by (" in expr and "cause" in expr, name
        (matcher,) = re.findall(r'cause=~?"([^"]+)"', expr)
        causes[name] = set(matcher.split("|"))
    assert causes == {"P28ObserveRefusedOutage": {"unavailable", "backlog", "given_up"},
                      "P28ObserveRefusedConfig": {"config_error"}, "P28ObserveRefusedInput": {"invalid_input"}}
    # The core's causes (observer_tasks/core/keys.py) must each have a home; the lead adds backlog and given_up.
    assert set(C.REFUSAL_CAUSES) <= set().union(*causes.values())


def test_guards_are_what_keeps_capacity_and_timing_silent(tmp_path: Path) -> None:
    """Each unit-test group named "...; guarded: <alerts>" is an outage in which <alerts> never go pending. Run the same
    series against the rules with the guards cut off: there each of them must go pending (or fire), so the
    silence is the guard's doing, not the series'."""
    shipped = yaml.safe_load(RULES.read_text())
    for group in shipped["groups"]:
        for rule in group["rules"]:
            rule["expr"] = unguarded(str(rule["expr"]))
    bare = tmp_path / "unguarded-rules.yml"
    bare.write_text(yaml.safe_dump(shipped, sort_keys=False, width=400))
    groups = [g for g in yaml.safe_load(RULE_TESTS.read_text())["tests"] if "guarded:" in str(g.get("name", ""))]
    assert len(groups) >= 6
    tests = []
    for g in groups:
        names = g["name"].split("guarded:", 1)[1].split()
        assert names and set(names) <= set(GUARDED), g["name"]
        end = max(int(str(c["eval_time"]).rstrip("m")) for c in g["alert_rule_test"])
        tests.append({"name": g["name"], "interval": g["interval"], "input_series": g["input_series"],
                      "promql_expr_test": [{"expr": f'count(count_over_time(ALERTS{{alertname="{n}"}}[1h])) > bool 0',
                                            "eval_time": f"{end + 10}m", "exp_samples": [{"labels": "{}", "value": 1}]}
                                           for n in names]})
    spec = tmp_path / "unguarded.test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(bare)], "evaluation_interval": "1m", "tests": tests},
                                   sort_keys=False))
    result = subprocess.run([tool("promtool"), "test", "rules", str(spec)], capture_output=True, text=True)
    assert result.returncode == 0, "without their guard these alerts stay silent anyway:\n" + result.stdout


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


def fault_groups() -> dict[str, list[dict[str, Any]]]:
    """The unit tests' groups by the fault their name gives ("fault: <fault>[; guarded: ...]")."""
    out: dict[str, list[dict[str, Any]]] = {}
    for g in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        m = re.match(r"fault: ([^;]+)", str(g.get("name", "")))
        if m:
            out.setdefault(m.group(1).strip(), []).append(g)
    return out


def runbook_fault_table() -> dict[str, tuple[set[str], set[str]]]:
    """docs/runbook.md's table "Which fault fires which alert": fault -> (alerts that fire, alerts that must not)."""
    text = (ROOT / "docs" / "runbook.md").read_text()
    section = text[text.index("### Which fault fires which alert"):]
    lines = section.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("| fault |"))
    rows = {}
    for line in lines[first + 2:]:
        if not line.startswith("|"):
            break  # the table's end
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = (set(re.findall(r"P28\w+", cells[1])), set(re.findall(r"P28\w+", cells[2])))
    return rows


def test_the_runbooks_fault_table_is_what_the_unit_tests_show() -> None:
    """Every row of the runbook's fault table has its unit-test groups (named "fault: <the row's fault>"): each alert
    the row says fires fires in one of them; each it says must not fire never fires in any of them and is checked
    silent (an alert_rule_test, or the never-pending ALERTS check) in at least one."""
    table, groups = runbook_fault_table(), fault_groups()
    assert len(table) >= 10 and set(table) == set(groups), (sorted(table), sorted(groups))
    known = set(rules())
    for fault, (fire, never) in table.items():
        assert fire and never and (fire | never) <= known, fault
        cases = [c for g in groups[fault] for c in g.get("alert_rule_test", [])]
        fired = {c["alertname"] for c in cases if c["exp_alerts"]}
        silent = {c["alertname"] for c in cases if not c["exp_alerts"]}
        for g in groups[fault]:
            for e in g.get("promql_expr_test", []):
                if "ALERTS" in e["expr"] and not e["exp_samples"]:
                    silent |= set(re.findall(r"P28\w+", e["expr"]))
        assert fire <= fired, f"{fault}: the runbook says {sorted(fire - fired)} fire(s); no unit test shows it"
        assert not never & fired, f"{fault}: the runbook says {sorted(never & fired)} must not fire; a test fires it"
        assert never <= silent, f"{fault}: no unit test shows {sorted(never - silent)} silent"
