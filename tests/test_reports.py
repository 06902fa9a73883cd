"""reports: the operator tools' arithmetic, and the operator modules' place in the import graph."""

from __future__ import annotations

import ast
import json
import math
import re
from pathlib import Path

import pytest

from observer_tasks.core import contract as C
from observer_tasks.core.settings import LATE_POINT, Settings
from observer_tasks.ops import latency, verify
from observer_tasks.ops import limits as L
from observer_tasks.ops import reports as R
from observer_tasks.ops.window import Snapshot, Window
from observer_tasks.worker.metrics import tally
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
    assert latency.next_wait_step(wait) == step


def snapshot(now_ms: int, **fields: int) -> Snapshot:
    """Counters as Redis holds them (contract.COUNTERS' fields), at a Redis time."""
    return Snapshot(now_ms, tally({name.replace("__", C.FIELD_SEP): n for name, n in fields.items()}, Settings()))


def window(before: dict[str, int] | None = None, after: dict[str, int] | None = None, ms: int = 10_000) -> Window:
    return Window(snapshot(1_000_000, **(before or {})), snapshot(1_000_000 + ms, **(after or {})))


LATE_OK = C.field(C.REASON, LATE_POINT, "ok", "wake", C.BUCKET + "500").replace(C.FIELD_SEP, "__")
LATE_TIMEOUT = C.field(C.REASON, LATE_POINT, "timeout", "look").replace(C.FIELD_SEP, "__")
BACKLOG = C.refused_field(LATE_POINT, "backlog").replace(C.FIELD_SEP, "__")
QUIET = window({C.DROPPED: 4}, {C.DROPPED: 4})  # four drops long ago, none now


def test_window_counts_what_moved_and_reads_a_reset_as_prometheus_does() -> None:
    w = window({C.DROPPED: 4, BACKLOG: 1, LATE_OK: 10}, {C.DROPPED: 10, BACKLOG: 4, LATE_OK: 12, LATE_TIMEOUT: 3})
    assert (w.seconds, w.dropped, w.rate(w.dropped)) == (10.0, 6, 0.6)
    assert w.refused == {(LATE_POINT, "backlog"): 3} and w.lifetime("p28_late_obs_dropped") == 10
    assert w.late_reasons() == {"ok": 2, "timeout": 3}
    # Coverage of the window: a dropped or refused plan was not observed, so it counts against the coverage.
    cov = w.coverage(Settings().obs_points)
    assert cov[LATE_POINT] == {"found": 2, "not_found": 3, "dropped": 6, "refused": 3, "total": 14,
                               "coverage_pct": 14.3}
    assert cov["create_apply_plan"]["total"] == 0 and w.plans(Settings().obs_points) == 14
    assert ["publish_plan_post", "dropped", "6", "not", "observed"] in [r.split() for r in
                                                                      R.coverage_table(cov).splitlines()]
    assert window({C.DROPPED: 50}, {C.DROPPED: 2}).dropped == 2  # the counters were reset in between
    assert QUIET.dropped == 0 and not QUIET.refused and QUIET.plans(Settings().obs_points) == 0


def test_advice_reads_the_window_not_the_lifetime_counters() -> None:
    """(Issue 26: after any saturation the advice said "raise MAX_INFLIGHT" for ever.)"""
    (line,) = verify.advice(4, 3, 0, QUIET, 2000, 200)
    assert "raise P28_LATE_OBS_MAX_WAIT_MS to 3000 (the runbook's steps: 2000 -> 3000 -> 4000)" in line
    assert "3000-5000" not in line
    dropping = window({C.DROPPED: 4}, {C.DROPPED: 6})
    lines = verify.advice(4, 3, 0, dropping, 2000, 200)
    assert "fix the drops first" in lines[0] and "raise P28_LATE_OBS_MAX_WAIT_MS" not in lines[0]
    assert lines[1].startswith("dropped 2 in the last 10 s (0.2/s): saturation (200 live leases): raise "
                               "P28_LATE_OBS_MAX_INFLIGHT first (e.g. 400)")
    assert verify.advice(4, 2, 0, QUIET, 2000, 200) == []  # 50% is not above the limit
    # Drops right after a Redis gap are the apply layers' replayed calls, not saturation.
    (after_gap,) = verify.advice(0, 0, 0, dropping, 2000, 200, after_gap=True)
    assert "not saturation" in after_gap and "MAX_INFLIGHT" not in after_gap
    refusing = window({BACKLOG: 1}, {BACKLOG: 5})
    (backlog,) = verify.advice(0, 0, 0, refusing, 2000, 200)
    assert backlog.startswith("refused 4 calls in the last 10 s (backlog): plans wait past their lease")


def test_the_tools_name_only_the_contracts_causes_families_and_variables() -> None:
    assert set(verify.REFUSAL_ADVICE) == set(C.REFUSAL_CAUSES)  # advice for every refusal cause, and no other
    assert {variable for variable, _roles in L.LIMITS.values()} <= set(Settings().as_env())
    families = set(tally({}, Settings()).samples)
    for source in ("window.py", "verify.py", "status.py"):
        # (a family, or its sample on /metrics: the family's name and _total)
        text = (PACKAGE / "ops" / source).read_text()
        named = {n.removesuffix("_total") for n in re.findall(r'"(p28_[a-z_]+)', text)}
        assert named <= families, (source, named - families)


def test_histogram_quantile_interpolates_within_its_bucket() -> None:
    buckets = [("0.5", 50.0), ("1.0", 90.0), ("2.0", 100.0), ("+Inf", 100.0)]
    assert latency.histogram_quantile(0.5, buckets) == (500.0, False)
    assert latency.histogram_quantile(0.7, buckets) == (750.0, False)
    assert latency.histogram_quantile(0.99, buckets) == (1900.0, False)
    assert latency.histogram_quantile(0.99, [("1.0", 0.0), ("+Inf", 5.0)]) == (1000.0, True)
    assert latency.histogram_quantile(0.99, [("1.0", 0.0), ("+Inf", 0.0)]) is None


def hist(p99_ms: int, hits: int = 1000) -> list[tuple[str, float]]:
    """A histogram of `hits` whose p99 (interpolated) is p99_ms: 98 % of them up to 100 ms below it, the rest up to
    100 ms above."""
    return [(str((p99_ms - 100) / 1000), 0.98 * hits), (str((p99_ms + 100) / 1000), float(hits)), ("+Inf", float(hits))]


@pytest.mark.parametrize(("p99", "wait", "expected"), [
    (1200, 2000, (2000, "keep")),     # need 1500 between 1000 and 2000
    (1700, 2000, (3000, "raise")),    # need 2125 above 2000: the runbook's next step
    (1700, 3000, (3000, "keep")),     # ... after which it is kept
    (3900, 4000, (4000, "last")),     # above the last step: no further raise
    (400, 2000, (500, "lower")),      # need 500 below half of 2000: the smallest step holding it
    (400, 500, (500, "keep")),        # ... after which it is kept
    (700, 2000, (1000, "lower")),     # need 875 -> 1000
    (900, 1000, (2000, "raise")),     # need 1125 above 1000 -> 2000; then kept
    (900, 2000, (2000, "keep")),
])
def test_recommendation_keeps_a_value_the_workload_fits_and_moves_by_the_runbooks_steps(
        p99: int, wait: int, expected: tuple[int, str]) -> None:
    r = latency.recommend(hist(p99), 1000, wait, 100)
    assert (r.wait_ms, r.action) == expected, r
    assert r.need_ms == math.ceil(r.p99_ms * latency.MARGIN)


def test_recommendation_needs_enough_hits_and_says_how_it_is_derived() -> None:
    assert latency.recommend(hist(1000, 99), 99, 2000, 100).action == "none"
    none = latency.recommendation_lines(latency.recommend(hist(1000, 5), 5, 2000, 100), 5, 2000, "x")
    assert none == ["recommended P28_LATE_OBS_MAX_WAIT_MS: none yet: 5 hits in the all-time histogram, fewer than "
                    "100 (too few for a p99)"]
    lines = latency.recommendation_lines(latency.recommend(hist(1700), 1000, 2000, 100), 1000, 2000, "env")
    assert lines[0].startswith("recommended P28_LATE_OBS_MAX_WAIT_MS=3000: the wait needed, 2125 ms, is above "
                               "MAX_WAIT_MS=2000 (hits reach the deadline")
    assert "only while drops are 0, then measure again" in lines[0]
    assert lines[1].startswith("  how: p99 of the all-time heat-wait histogram (1000 hits) 1700 ms x 1.25")


def test_histogram_rows_per_bucket_and_cumulative() -> None:
    rows = R.histogram_rows([("0.5", 3.0), ("1.0", 5.0), ("+Inf", 5.0)], 5)
    assert rows == [("500", 3, 3, "60.0%"), ("1000", 2, 5, "100.0%"), ("+Inf", 0, 5, "100.0%")]
    assert R.histogram_rows([("0.005", 0.0)], 0) == [("5", 0, 0, "-")]


def test_verification_without_metrics_fails_both_metrics_checks_with_the_reason() -> None:
    report = verify.verification([entry("publish_plan_post", "ok")], None, "cannot read X: why", "X", 600, QUIET,
                                 Settings().obs_points, 2000, 200)
    assert report["healthy"] is False
    assert [c["ok"] for c in report["checks"]] == [True, False, False, True, True, True]
    assert report["checks"][1]["detail"] == "cannot read X: why"


def test_verification_fails_on_drops_and_refusals_of_the_window_and_counts_them_against_coverage() -> None:
    entries = [entry("publish_plan_post", "ok")] * 8 + [entry("publish_plan_post", "timeout")] * 2
    dropping = window({C.DROPPED: 4, LATE_OK: 10}, {C.DROPPED: 10, LATE_OK: 14, BACKLOG: 2})
    report = verify.verification(entries, {}, "", "X", 600, dropping, Settings().obs_points, 2000, 200)
    failed = [c["name"] for c in report["checks"] if not c["ok"]]
    assert failed[-2:] == ["no plans dropped in the window", "no calls refused in the window"]
    assert report["checks"][-2]["detail"] == ("6 in the last 10 s (0.6/s); p28_late_obs_dropped_total 10 all time")
    # The stream's newest entries say 80 %; the window's plans, 4 of 12 observed with heat: 33.3 %.
    assert report["coverage"][LATE_POINT]["coverage_pct"] == 33.3
    assert report["coverage_of"] == "the last 10 s: plans recorded, dropped and refused"
    assert report["window"]["refused"] == {"publish_plan_post:backlog": 2}


def test_limits_of_the_running_processes_and_their_mismatches() -> None:
    env = L.of_env(Settings())
    apply = L.of("h:1", "apply", 3000, {"max_inflight": 400, "max_wait_ms": 2000, "poll_ms": 100,
                                        "safety_poll_ms": 2000, "points": ["create_apply_plan"]})
    worker = L.of("celery@w", "worker", 300, {"max_inflight": 200, "max_wait_ms": 2000, "poll_ms": 100,
                                              "safety_poll_ms": 2000, "points": ["create_apply_plan"]})
    assert worker.values["max_inflight"] is None  # the admission's limit: a worker's own is not compared
    assert L.mismatches([apply, worker, env]) == [
        "P28_LATE_OBS_MAX_INFLIGHT differs: 400 on apply h:1; 200 on this environment",
        "P28_HEAT_OBS_POINTS differs: create_apply_plan on apply h:1, worker celery@w; "
        "create_apply_plan,reconcile_close_consume on this environment"]
    assert L.in_force([apply, worker], "max_inflight", 200) == (400, "the running apply layers'")
    assert L.in_force([worker], "max_inflight", 200) == (200, "this environment's; no apply layer has reported")
    other = L.of("h:2", "apply", 0, {"max_inflight": 300})
    assert L.in_force([apply, other], "max_inflight", 200)[0] == 200
    raw = {b"h:1": json.dumps({"seen_ms": 990, "max_inflight": 1}).encode(), b"old": b'{"seen_ms": 1}', b"x": b"?"}
    assert [p.name for p in L.fresh(raw, "apply", 1000, 100)] == ["h:1"]


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
