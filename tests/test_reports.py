"""reports: the operator tools' arithmetic, and the operator modules' place in the import graph."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from observer_tasks.core.settings import LATE_POINT, Settings
from observer_tasks.ops import reports as R
from tests.conftest import ROOT

PACKAGE = ROOT / "observer_tasks"


def entry(point: str, reason: str, wait_ms: int | None = None) -> dict[str, str]:
    e = {"obs_point": point, "heat_found": "1" if reason == "ok" else "0", "heat_reason": reason}
    if wait_ms is not None:
        e["wait_ms"] = str(wait_ms)
    return e


def test_coverage_and_reasons() -> None:
    entries = [entry("publish_plan_post", "ok")] * 3 + [entry("publish_plan_post", "timeout")] + \
              [entry("create_apply_plan", "missing")] * 2
    cov = R.coverage(entries)
    assert cov["publish_plan_post"] == {"found": 3, "not_found": 1, "total": 4, "coverage_pct": 75.0}
    assert cov["create_apply_plan"] == {"found": 0, "not_found": 2, "total": 2, "coverage_pct": 0.0}
    # Every configured point is listed, in the configured order, the late point last; one without entries
    # shows no coverage yet (P28_HEAT_OBS_POINTS: reconcile_close_consume is configured by default).
    assert list(cov) == [*Settings().early_points, LATE_POINT]
    assert cov["reconcile_close_consume"] == {"found": 0, "not_found": 0, "total": 0, "coverage_pct": None}
    assert R.reasons(entries) == {"create_apply_plan": {"missing": 2}, "reconcile_close_consume": {},
                                  "publish_plan_post": {"ok": 3, "timeout": 1}}
    assert R.coverage([])["publish_plan_post"]["coverage_pct"] is None
    # A point the entries carry that is no longer configured (an older configuration) is listed after them.
    old = R.coverage([*entries, entry("retired_point", "ok")], points=("create_apply_plan", LATE_POINT))
    assert list(old) == ["create_apply_plan", LATE_POINT, "retired_point"]
    assert old["retired_point"]["found"] == 1


def test_percentiles_and_late_waits() -> None:
    assert R.percentiles([]) is None
    assert R.percentiles([7]) == {"p50": 7, "p90": 7, "p95": 7, "p99": 7, "max": 7, "n": 1}
    p = R.percentiles(list(range(100, 1001, 100)))
    assert p == {"p50": 550, "p90": 910, "p95": 955, "p99": 991, "max": 1000, "n": 10}
    hits, timeouts = R.late_waits([entry("publish_plan_post", "ok", 120), entry("publish_plan_post", "timeout", 2001),
                                   entry("publish_plan_post", "redis_error", 50), entry("create_apply_plan", "ok", 1),
                                   entry("publish_plan_post", "ok")])
    assert (hits, timeouts) == ([120], [2001])


@pytest.mark.parametrize(("wait", "step"), [(2000, 3000), (3000, 4000), (2500, 3000), (600, 1000), (4000, None),
                                            (9000, None)])
def test_next_wait_step_follows_the_runbook(wait: int, step: int | None) -> None:
    assert R.next_wait_step(wait) == step


def test_advice_raises_max_wait_one_runbook_step_and_never_while_dropping() -> None:
    zero = {"timeout": 3.0, "redis_error": 0.0, "dropped": 0.0}
    (line,) = R.advice(4, 3, zero, 2000)
    assert "raise P28_LATE_OBS_MAX_WAIT_MS to 3000 (the runbook's steps: 2000 -> 3000 -> 4000)" in line
    assert "3000-5000" not in line
    lines = R.advice(4, 3, {**zero, "dropped": 2.0}, 2000)
    assert "fix the drops first" in lines[0] and "raise P28_LATE_OBS_MAX_WAIT_MS" not in lines[0]
    assert lines[1].startswith("dropped=2: saturation")
    assert R.advice(4, 2, zero, 2000) == []  # 50% is not above the limit


def test_wait_advice_points_at_the_next_step_when_hits_reach_the_deadline() -> None:
    settings = Settings(late_obs_max_wait_ms=2000, late_obs_poll_ms=100)
    lines = R.wait_advice({"p99": 1950}, settings)
    assert lines[-1].startswith("note: hits reach the deadline")
    assert "raise P28_LATE_OBS_MAX_WAIT_MS to 3000" in lines[-1]
    assert R.wait_advice(None, settings) == ["no publish_plan_post hits yet: no latency data to tune MAX_WAIT_MS with"]


def test_histogram_rows_per_bucket_and_cumulative() -> None:
    rows = R.histogram_rows([("0.5", 3.0), ("1.0", 5.0), ("+Inf", 5.0)], 5)
    assert rows == [("500", 3, 3, "60.0%"), ("1000", 2, 5, "100.0%"), ("+Inf", 0, 5, "100.0%")]
    assert R.histogram_rows([("0.005", 0.0)], 0) == [("5", 0, 0, "-")]


def test_verification_without_metrics_fails_both_metrics_checks_with_the_reason() -> None:
    report = R.verification([entry("publish_plan_post", "ok")], None, "cannot read X: why", "X", 600, 2000)
    assert report["healthy"] is False
    assert [c["ok"] for c in report["checks"]] == [True, False, False, True]
    assert report["checks"][1]["detail"] == "cannot read X: why"


def imports_of(path: Path) -> set[str]:
    """Every observer_tasks module a file imports (dotted, below the package), at module level or in functions."""
    here = path.relative_to(PACKAGE).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(here[: len(here) - node.level + 1])
                mod = base + (node.module.split(".") if node.module else [])
                found.update(".".join(mod + ([a.name] if not node.module else [])) for a in node.names)
            elif node.module and node.module.startswith("observer_tasks."):
                found.add(node.module.removeprefix("observer_tasks."))
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("observer_tasks.") for a in node.names
                         if a.name.startswith("observer_tasks."))
    return found


#: Which roles each role may import: the core none, the apply layer's side and the worker the core only,
#: the drop-in modules for replaced systems (compat) the apply layer's side, the operator's tools anything below
#: them. (The package's __init__ is the public API: core and client.)
ALLOWED = {"core": {"core"}, "client": {"core", "client"}, "worker": {"core", "worker"},
           "compat": {"core", "client", "compat"}, "ops": {"core", "client", "worker", "ops"}}


def test_the_tree_is_the_roles_and_each_imports_only_downward() -> None:
    modules = {p: p.relative_to(PACKAGE).parts[0] for p in PACKAGE.glob("*/*.py")}
    assert set(modules.values()) == set(ALLOWED), "a module outside core/ client/ worker/ ops/"
    assert [p.name for p in PACKAGE.glob("*.py")] == ["__init__.py"]
    for path, role in modules.items():
        for target in imports_of(path):
            assert target.split(".")[0] in ALLOWED[role], f"{path.relative_to(PACKAGE)} ({role}) imports {target}"
    top = imports_of(PACKAGE / "__init__.py")
    assert {t.split(".")[0] for t in top} <= {"core", "client"}, top


def test_no_import_cycles_and_no_deferred_imports() -> None:
    def module_of(target: str) -> str:
        """'core.keys.check_plan_id' -> 'core.keys' (a name imported from a module: the module)."""
        is_module = (PACKAGE / (target.replace(".", "/") + ".py")).exists()
        return target if is_module else target.rsplit(".", 1)[0]

    graph = {".".join(p.relative_to(PACKAGE).with_suffix("").parts): {module_of(t) for t in imports_of(p)}
             for p in PACKAGE.glob("*/*.py") if p.stem != "__init__"}

    def reaches(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    for name in graph:
        assert name not in reaches(name), f"{name} is in an import cycle"
    for path in PACKAGE.glob("*/*.py"):
        tree = ast.parse(path.read_text())
        deferred = [n.lineno for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                    for n in ast.walk(f) if isinstance(n, ast.Import | ast.ImportFrom)]
        assert not deferred, f"{path.relative_to(PACKAGE)} imports inside a function at line(s) {deferred}"
