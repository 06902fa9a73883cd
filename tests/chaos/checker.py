"""The independent checker: the soak's history judged from the apply log, HeatBridge's log, the observed stream,
a worker's /metrics page, the inflight set and the harness's own records (evidence.py), never from what the
observer says about itself (no internal module, no debug_json to excuse anything; debug_json is only shown).

Each figure, per fault kind; zero is the goal for every one (docs/reliability.md, "The chaos soak"):

- ``doubled``: plans with more than one entry at one obs point;
- ``silent``: plans handed over (``enqueued``, ``deferred``; for ``observe`` also a reason returned) with no
  entry and not accounted for by a count (see ``account``);
- ``refused_rec``: plans refused (``error``, ``dropped``, a ``duplicate`` with no earlier call) yet recorded;
- ``counters``: series of ``p28_heat_reason_total`` and ``p28_observed_total`` (their increase over the run)
  that differ from the stream's entries (only in the ``all`` row: counters name no plan);
- ``false_to``: ``timeout`` entries whose heat HeatBridge had acknowledged before the plan's deadline, taken as
  the call's start + MAX_WAIT_MS (the admission's Redis time is at or after the start) - ``margin_s``, unless
  HeatBridge's audit found the write gone from the final master (Redis lost it: shown apart);
- ``ok_no_heat``: ``ok`` entries of a plan HeatBridge never wrote (no line at all; a plan whose writes all
  failed, one of them ambiguously, is shown apart);
- ``raised`` / ``slow``: calls that raised, or took longer than CALL_TIMEOUT_S + the scheduling allowance;
- ``exits``: worker exits the harness did not cause (with the worker's last log lines);
- ``leases``: members of the inflight set left after the drain.

A plan belongs to every fault whose reach (its window, plus ``settle_s`` after it) overlaps the plan's window
(its late call's start to start + MAX_WAIT_MS); a call to the fault active while it ran; an exit to the fault
active when it happened; with no such fault, to ``none``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from .accounting import arrivals, match
from .evidence import Call, Evidence

EARLY, LATE = "create_apply_plan", "publish_plan_post"
FIGURES = ("doubled", "silent", "refused_rec", "counters", "false_to", "ok_no_heat", "raised", "slow", "exits",
           "leases")
RECORDED_REASONS = ("ok", "missing", "parse_error")  # what observe() returns when it recorded the plan itself


@dataclass
class Report:
    rows: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    info: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    max_ms: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    totals: Counter[str] = field(default_factory=Counter)
    notes: dict[str, Any] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    harness_errors: list[str] = field(default_factory=list)  # faults the harness could not carry out

    def add(self, figure: str, row: str, example: str | None = None) -> None:
        self.rows[row][figure] += 1
        self.totals[figure] += 1
        if example is not None and len(self.examples[figure]) < 5:
            self.examples[figure].append(f"[{row}] {example}")

    @property
    def failed(self) -> bool:
        return bool(self.harness_errors) or any(self.totals[f] for f in FIGURES)


class Checker:
    def __init__(self, ev: Evidence) -> None:
        self.ev = ev
        s = ev.settings
        self.max_wait = s["max_wait_ms"] / 1000
        self.cap = s["call_cap_s"] + s["allowance_s"]
        self.settle, self.margin = s["settle_s"], s["margin_s"]
        self.report = Report()
        self.by_plan: dict[tuple[str, str], list[Call]] = defaultdict(list)
        for c in ev.calls:
            self.by_plan[(c.obs_point, c.plan)].append(c)
        self.recorded: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
        for e in ev.entries:
            self.recorded[(e.get("obs_point", ""), e.get("plan_id", ""))].append(e)

    def row(self, t0: float, t1: float) -> str:
        kinds = sorted({w.kind for w in self.ev.faults if w.start <= t1 and t0 <= w.end + self.settle})
        return "+".join(kinds) or "none"

    def plan_row(self, plan: str) -> str:
        calls = self.by_plan.get((LATE, plan)) or self.by_plan.get((EARLY, plan))
        return self.row(calls[0].t, calls[0].t + self.max_wait) if calls else "none"

    def check(self) -> Report:
        for step in (self.calls, self.doubled, self.refused_recorded, self.account, self.counters,
                     self.false_timeouts, self.ok_without_heat, self.exits, self.leases):
            step()
        self.report.notes["vanished entries (read during the run from a master whose data did not survive)"] = \
            len(self.ev.vanished)
        for e in self.ev.vanished[:3]:
            self.report.examples["vanished"].append(f"{e['_id']} {e.get('obs_point')} {e.get('plan_id')} "
                                                    f"{e.get('heat_reason')} by {e.get('recorded_by', '-')}")
        audit = self.ev.audit or {}
        self.report.notes["HeatBridge writes acknowledged, then absent from the final master (audit)"] = \
            f"{len(self.ev.lost_writes)} of {audit.get('audit', '?')} read back {audit.get('error', '')}".rstrip()
        self.report.notes["HeatBridge writes failed (ambiguous)"] = \
            f"{len(self.ev.failed_writes)} ({sum(bool(w.get('ambiguous')) for w in self.ev.failed_writes.values())})"
        self.report.harness_errors = [f"fault #{r['n']} {r['kind']}: {r['error']}" for r in self.ev.fault_records
                                      if r.get("error")]
        return self.report

    # -- the figures ---------------------------------------------------------------
    def calls(self) -> None:
        r = self.report
        for c in self.ev.calls:
            row = self.row(c.t, c.t + c.dur)
            r.max_ms[row] = max(r.max_ms[row], c.dur * 1000)
            r.max_ms["all"] = max(r.max_ms["all"], c.dur * 1000)
            if c.raised:
                r.add("raised", row, c.line)
            elif c.dur > self.cap:
                r.add("slow", row, c.line)
            r.info[self.plan_row(c.plan)][f"{'late' if c.obs_point == LATE else 'early'}:{c.result}"] += 1
        for e in self.ev.entries:
            if e.get("obs_point") == LATE:
                r.info[self.plan_row(e.get("plan_id", ""))][f"reason:{e.get('heat_reason')}"] += 1

    def doubled(self) -> None:
        for (point, plan), entries in self.recorded.items():
            if len(entries) > 1:
                shown = "; ".join(f"{e['_id']} {e.get('heat_reason')} by {e.get('recorded_by', '-')}" for e in entries)
                self.report.add("doubled", self.plan_row(plan), f"{point} {plan}: {len(entries)} entries: {shown}")

    def refused(self, c: Call) -> bool:
        if c.result in ("error", "dropped"):
            return True
        earlier = [d for d in self.by_plan[(c.obs_point, c.plan)] if d.t < c.t]
        return c.result == "duplicate" and not earlier

    def handed_over(self, c: Call) -> bool:
        """The observer took the plan on: it must end in an entry, or in a count that says it was given up."""
        return c.result in ("enqueued", "deferred") or (c.obs_point == EARLY and c.result in RECORDED_REASONS) \
            or (c.result == "duplicate" and self.refused(c))

    def refused_recorded(self) -> None:
        for c in self.ev.calls:
            entries = self.recorded.get((c.obs_point, c.plan))
            if entries and self.refused(c):
                self.report.add("refused_rec", self.plan_row(c.plan),
                                f"{c.line} -> entry {entries[0]['_id']} {entries[0].get('heat_reason')}")

    def delta(self, name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        end = self.ev.metrics_end or {}
        return end.get(key, 0.0) - self.ev.metrics_start.get(key, 0.0)

    def total(self, values: dict[Any, float] | None, select: Any) -> float:
        return sum(v for (name, labels), v in (values or {}).items() if select(name, dict(labels)))

    def units(self, select: Any) -> list[float]:
        return arrivals(self.ev.timeline, select, self.total(self.ev.metrics_start, select),
                        self.total(self.ev.metrics_end, select))

    def account(self) -> None:
        """Handed-over plans without an entry, and refused calls, matched to the counts that say "given up".

        An absent late ``enqueued`` plan was admitted: only p28_late_obs_lost_total can account for it (its lease
        vanished in a failover). A late call that returned ``error`` or ``dropped``, and an absent late
        ``deferred`` plan, each need one unit of p28_observe_refused_total{obs_point="publish_plan_post"} (every
        cause but invalid_input) or p28_late_obs_dropped_total, or of ``lost`` left over; an early ``error`` call
        and an absent early ``deferred`` plan one of the early refusals. An early call that returned a reason, or
        a false ``duplicate``, recorded nothing countable: nothing accounts for its absence. Units are matched
        by time (accounting.py). An absent plan left unmatched is ``silent``; a refused call left unmatched was
        refused and not counted (shown).
        """
        r = self.report

        def refused(point: str) -> Any:
            return lambda n, lb: n == "p28_observe_refused_total" and lb.get("obs_point") == point and \
                lb.get("cause") != "invalid_input"

        def lost(n: str, lb: dict[str, str]) -> bool:
            return n == "p28_late_obs_lost_total"

        def late(n: str, lb: dict[str, str]) -> bool:
            return refused(LATE)(n, lb) or n == "p28_late_obs_dropped_total"

        absent = [c for c in self.ev.calls if self.handed_over(c) and not self.recorded.get((c.obs_point, c.plan))]
        gone_enqueued, lost_left = match([(c.t, c) for c in absent if c.obs_point == LATE and c.result == "enqueued"],
                                         self.units(lost))
        unmatched: list[tuple[str, Call]] = []
        for point, pool, refusals in ((LATE, self.units(late) + lost_left, ("error", "dropped")),
                                      (EARLY, self.units(refused(EARLY)), ("error",))):
            claims = [(c.t, ("call", c)) for c in self.ev.calls if c.obs_point == point and c.result in refusals]
            claims += [(c.t, ("absent", c)) for c in absent if c.obs_point == point and c.result == "deferred"]
            unmatched += match(claims, pool)[0]
        silent = set(map(id, gone_enqueued)) | {id(c) for kind, c in unmatched if kind == "absent"}
        for c in absent:
            excusable = c.result in ("enqueued", "deferred")
            if excusable and id(c) not in silent:
                r.info[self.plan_row(c.plan)]["counted"] += 1
            else:
                r.add("silent", self.plan_row(c.plan), c.line)
        uncounted = [c for kind, c in unmatched if kind == "call"]
        r.notes["refusals or drops returned but not counted"] = len(uncounted)
        for c in uncounted[:3]:
            r.examples["returned error or dropped, not counted"].append(c.line)
        results = Counter((c.obs_point, c.result) for c in self.ev.calls)
        r.notes["counts: refusals early/late (calls that returned error), drops (returned dropped), lost"] = (
            f"{self.total(self.ev.metrics_end, refused(EARLY)) - self.total(self.ev.metrics_start, refused(EARLY)):.0f}"
            f" ({results[(EARLY, 'error')]}) / "
            f"{self.total(self.ev.metrics_end, refused(LATE)) - self.total(self.ev.metrics_start, refused(LATE)):.0f}"
            f" ({results[(LATE, 'error')]}), {self.delta('p28_late_obs_dropped_total'):.0f} "
            f"({results[(LATE, 'dropped')]}), {self.delta('p28_late_obs_lost_total'):.0f}; counts seen over time: "
            f"{'yes' if self.ev.timeline else 'no (matched by call order)'}")

    def counters(self) -> None:
        if self.ev.metrics_end is None:
            self.report.add("counters", "all", "no /metrics page was read at the end")
            return
        reasons = Counter((e.get("obs_point", ""), e.get("heat_reason", "")) for e in self.ev.entries)
        found = Counter((e.get("obs_point", ""), e.get("heat_found", "")) for e in self.ev.entries)
        series: list[tuple[str, dict[str, str], int]] = []
        for name, labels in {*self.ev.metrics_end, *self.ev.metrics_start}:
            lb = dict(labels)
            if name == "p28_heat_reason_total":
                series.append((name, lb, reasons.pop((lb["obs_point"], lb["reason"]), 0)))
            elif name == "p28_observed_total":
                series.append((name, lb, found.pop((lb["obs_point"], lb["heat_found"]), 0)))
        for (point, reason), n in reasons.items():  # in the stream, in no series
            series.append(("p28_heat_reason_total", {"obs_point": point, "reason": reason}, n))
        for (point, hf), n in found.items():
            series.append(("p28_observed_total", {"heat_found": hf, "obs_point": point}, n))
        for name, lb, n in sorted(series, key=lambda s: (s[0], sorted(s[1].items()))):
            counted = self.delta(name, **lb)
            if counted != n:
                shown = ",".join(f'{k}="{v}"' for k, v in sorted(lb.items()))
                self.report.add("counters", "all", f"{name}{{{shown}}}: counter +{counted:.0f}, stream {n}")

    def false_timeouts(self) -> None:
        for e in self.ev.entries:
            plan = e.get("plan_id", "")
            ack = self.ev.acks.get(plan)
            calls = self.by_plan.get((LATE, plan))
            if e.get("obs_point") != LATE or not ack or not calls:
                continue
            in_time = ack["ack"] <= calls[0].t + self.max_wait - self.margin
            if in_time and plan in self.ev.lost_writes:  # Redis lost the heat: nothing left to find
                self.report.info[self.plan_row(plan)][f"{e.get('heat_reason')}, heat lost by Redis"] += 1
            elif in_time and e.get("heat_reason") == "timeout":
                self.report.add("false_to", self.plan_row(plan),
                                f"{plan}: called {calls[0].t:.3f}, heat acknowledged {ack['ack']:.3f} "
                                f"({ack['ack'] - calls[0].t:.3f} s after the call, replicas {ack.get('replicas')}); "
                                f"entry {_entry(e)}")
            elif in_time and e.get("heat_reason") in ("redis_error", "missing"):
                self.report.info[self.plan_row(plan)][f"{e.get('heat_reason')} with heat in time"] += 1

    def ok_without_heat(self) -> None:
        for e in self.ev.entries:
            if e.get("heat_reason") != "ok":
                continue
            plan, point = e.get("plan_id", ""), e.get("obs_point", "")
            ack, failed = self.ev.acks.get(plan), self.ev.failed_writes.get(plan)
            calls = self.by_plan.get((point, plan))
            if not ack and not failed:
                self.report.add("ok_no_heat", self.plan_row(plan), f"{point} {plan}: no heat written; {_entry(e)}")
            elif not ack:
                self.report.info[self.plan_row(plan)]["ok after an ambiguous failed write"] += 1
            elif point == EARLY and calls and not ack.get("ambiguous_before") and \
                    ack["ack"] > calls[0].t + calls[0].dur + self.margin:
                # Heat the apply layer could not have seen at create_apply_plan (a deferred look made later):
                # shown, not a figure (the brief's figure is heat never written).
                self.report.info[self.plan_row(plan)]["early ok, heat written after the call"] += 1
                if len(self.report.examples["early ok after the call"]) < 3:
                    self.report.examples["early ok after the call"].append(
                        f"{plan}: heat acknowledged {ack['ack'] - calls[0].t:.3f} s after the call started; "
                        f"{_entry(e)}")

    def exits(self) -> None:
        for x in self.ev.exits:
            if not x.get("caused"):
                tail = " | ".join(self.ev.worker_log_tail(x["log"]))
                self.report.add("exits", self.row(x["t"], x["t"]),
                                f"{x['worker']} (pid {x['pid']}, code {x['code']}) exited; log {x['log']}: {tail}")

    def leases(self) -> None:
        for plan, score in self.ev.inflight:
            self.report.add("leases", self.plan_row(plan), f"{plan} (lease end {score:.0f})")


def _entry(e: dict[str, str]) -> str:
    keys = ("heat_reason", "heat_ts_epoch", "ts_epoch", "wait_ms", "recorded_by", "debug_json")
    return f"{e['_id']} " + " ".join(f"{k}={e.get(k, '')}" for k in keys)


def check(ev: Evidence) -> Report:
    return Checker(ev).check()
