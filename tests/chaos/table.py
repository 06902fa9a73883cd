"""The checker's report as text: the figures' table (rows: fault kinds; zero is the goal in every cell), the
outcomes behind them (what the calls returned, the late entries' reasons), the accounting notes and up to
five examples per figure with their log lines."""

from __future__ import annotations

from .checker import FIGURES, Report

OUTCOMES = ("late:enqueued", "late:deferred", "late:error", "late:dropped", "late:duplicate", "early:deferred",
            "early:error", "counted", "reason:ok", "reason:timeout", "reason:redis_error", "reason:missing",
            "reason:parse_error", "redis_error with heat in time", "missing with heat in time",
            "early ok, heat written after the call", "ok after an ambiguous failed write",
            "timeout, heat lost by Redis", "ok, heat lost by Redis", "redis_error, heat lost by Redis")


def _rows(report: Report) -> list[str]:
    rows = sorted(set(report.rows) | set(report.info) - {"all"}, key=lambda r: (r == "none", r))
    return [r for r in rows if r != "all"] + ["all"]


def render(report: Report) -> str:
    rows = _rows(report)
    width = max(12, *(len(r) for r in rows))
    plans = {r: sum(n for k, n in report.info[r].items() if k.startswith("late:")) for r in rows}
    plans["all"] = sum(plans[r] for r in rows if r != "all")
    head = f"{'fault':<{width}} {'plans':>6} " + " ".join(f"{f:>11}" for f in FIGURES) + f" {'max call ms':>11}"
    out = ["CHAOS checker: figures per fault kind (zero is the goal)", head, "-" * len(head)]
    for r in rows:
        counts = report.totals if r == "all" else report.rows[r]
        cells = []
        for f in FIGURES:
            cells.append(f"{counts.get(f, 0):>11}" if f != "counters" or r == "all" else f"{'-':>11}")
        out.append(f"{r:<{width}} {plans[r]:>6} " + " ".join(cells) + f" {report.max_ms.get(r, 0.0):>11.1f}")
    out += ["", "CHAOS outcomes per fault kind (informational)"]
    present = [o for o in OUTCOMES if any(report.info[r].get(o) for r in rows if r != "all")]
    out.append(f"{'fault':<{width}} " + " ".join(f"{o:>{max(8, len(o))}}" for o in present))
    for r in rows:
        values = report.info[r] if r != "all" else \
            {o: sum(report.info[x].get(o, 0) for x in rows if x != "all") for o in present}
        out.append(f"{r:<{width}} " + " ".join(f"{values.get(o, 0):>{max(8, len(o))}}" for o in present))
    out += ["", "CHAOS notes"]
    out += [f"  {k}: {v}" for k, v in report.notes.items()]
    for f in (*FIGURES, *(k for k in report.examples if k not in FIGURES)):
        if report.examples.get(f):
            out += ["", f"CHAOS examples: {f} ({report.totals[f] if f in FIGURES else 'informational'})"]
            out += [f"  {line}" for line in report.examples[f]]
    for error in report.harness_errors:
        out.append(f"CHAOS harness error (the soak did not do what its schedule says): {error}")
    figures = ", ".join(f"{f} {report.totals[f]}" for f in FIGURES if report.totals[f]) or "every figure zero"
    harness = f"; {len(report.harness_errors)} fault(s) not carried out" if report.harness_errors else ""
    out += ["", f"CHAOS result: {'FAIL' if report.failed else 'PASS'} ({figures}{harness})"]
    return "\n".join(out)
