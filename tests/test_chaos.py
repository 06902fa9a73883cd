"""The chaos soak's checker catches what it claims, and a short seed of the soak itself.

The fast tests write a consistent synthetic run (the files the soak writes: apply log, HeatBridge log, stream,
/metrics pages, inflight set, the harness's records) on which every figure is zero, then break one rule on
purpose and assert the checker reports exactly that figure, once, and nothing else. The slow test runs the soak
(docs/reliability.md, "The chaos soak") for a short seed and fails when any figure is not zero.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from .chaos.checker import FIGURES, Report, check
from .chaos.evidence import load, merge_stream
from .chaos.schedule import REDIS_KINDS, draw
from .chaos.table import render
from .conftest import cannot_run

LATE, EARLY = "publish_plan_post", "create_apply_plan"
T0 = 1_800_000_000.0
REASONS = ("ok", "missing", "timeout", "redis_error", "parse_error")


class Run:
    """A consistent synthetic run: every plan called at 40/s, heat for two of three 0.4 s after the call,
    each recorded once at both points, the counters equal to the stream, nothing left."""

    def __init__(self, plans: int = 30) -> None:
        self.calls: list[dict[str, Any]] = []
        self.heat: list[dict[str, Any]] = []
        self.entries: list[dict[str, Any]] = []
        self.extra_counts: Counter[tuple[str, str]] = Counter()  # (name, labels) -> added to the end page
        self.inflight: list[list[Any]] = []
        self.exits: list[dict[str, Any]] = []
        self.faults: list[dict[str, Any]] = []
        self.timeline: list[tuple[float, str]] = []  # (when, the count lines of a /metrics page then)
        for i in range(plans):
            t, plan = T0 + i / 40, f"c{i:06d}"
            self.call(plan, EARLY, t, "missing")
            self.call(plan, LATE, t + 0.0002, "enqueued")
            self.entry(plan, EARLY, "missing", t)
            if i % 3:
                self.heat.append({"plan": plan, "due": t + 0.4, "ack": t + 0.4, "replicas": 1, "attempts": 1,
                                  "ambiguous_before": False})
            self.entry(plan, LATE, "ok" if i % 3 else "timeout", t + (0.4 if i % 3 else 2.0))

    def call(self, plan: str, point: str, t: float, result: str, dur: float = 0.0003, **more: Any) -> None:
        self.calls.append({"kind": "call", "plan": plan, "obs_point": point, "t": t, "dur": dur, "result": result,
                           "raised": None, "burst": None, **more})

    def entry(self, plan: str, point: str, reason: str, ts: float) -> None:
        self.entries.append({"id": f"{int(ts * 1000)}-{len(self.entries)}", "fields": {
            "ts_epoch": f"{ts:.3f}", "plan_id": plan, "obs_point": point, "heat_found": "1" if reason == "ok" else "0",
            "heat_reason": reason, "recorded_by": "wake" if reason == "ok" else "look"}})

    def find(self, plan: str, point: str) -> dict[str, Any]:
        return next(e for e in self.entries if e["fields"]["plan_id"] == plan and e["fields"]["obs_point"] == point)

    def metrics(self, entries: list[dict[str, Any]], extra: bool) -> str:
        counts: Counter[tuple[str, str]] = Counter()
        for point in (EARLY, LATE):
            for reason in REASONS:
                counts[("p28_heat_reason_total", f'obs_point="{point}",reason="{reason}"')] += 0
            for found in "01":
                counts[("p28_observed_total", f'heat_found="{found}",obs_point="{point}"')] += 0
            for cause in ("invalid_input", "unavailable", "config_error"):
                counts[("p28_observe_refused_total", f'cause="{cause}",obs_point="{point}"')] += 0
        for e in entries:
            f = e["fields"]
            counts[("p28_heat_reason_total", f'obs_point="{f["obs_point"]}",reason="{f["heat_reason"]}"')] += 1
            counts[("p28_observed_total", f'heat_found="{f["heat_found"]}",obs_point="{f["obs_point"]}"')] += 1
        counts[("p28_late_obs_dropped_total", "")] += 0
        counts[("p28_late_obs_lost_total", "")] += 0
        if extra:
            counts.update(self.extra_counts)
        lines = []
        for name in sorted({n for n, _ in counts}):
            lines.append(f"# TYPE {name.removesuffix('_total')} counter")
            series = [(lb, v) for (n, lb), v in sorted(counts.items()) if n == name]
            lines += [f"{name}{{{lb}}} {v}.0" if lb else f"{name} {v}.0" for lb, v in series]
        return "\n".join(lines) + "\n"

    def write(self, d: Path, trimmed: int = 0, vanished: tuple[str, ...] = ()) -> Path:
        """The run's files; ``trimmed``: the final stream lacks the first N entries (only the tail has them);
        ``vanished``: entries the tail read and then found gone after a change of master (counted by nobody)."""
        d.mkdir(parents=True, exist_ok=True)
        settings = {"max_wait_ms": 2000, "call_cap_s": 0.05, "allowance_s": 0.02, "settle_s": 5.0, "margin_s": 0.01}
        (d / "settings.json").write_text(json.dumps(settings))
        (d / "apply.jsonl").write_text("".join(json.dumps(c, separators=(",", ":")) + "\n" for c in self.calls))
        (d / "heat.jsonl").write_text("".join(json.dumps(h) + "\n" for h in self.heat))
        ordered = sorted(self.entries, key=lambda e: tuple(int(x) for x in e["id"].split("-")))
        kept = [e for e in ordered if e["id"] not in vanished]
        (d / "stream_final.jsonl").write_text("".join(json.dumps(e) + "\n" for e in kept[trimmed:]))
        (d / "stream_tail.jsonl").write_text("".join(json.dumps({**e, "port": 1}) + "\n" for e in ordered) +
                                             "".join(json.dumps({"vanished": i, "port": 2}) + "\n" for i in vanished))
        (d / "metrics_start.prom").write_text(self.metrics([], extra=False))
        (d / "metrics_end.prom").write_text(self.metrics(kept, extra=True))
        (d / "inflight.json").write_text(json.dumps({"members": self.inflight}))
        (d / "faults.jsonl").write_text("".join(json.dumps(f) + "\n" for f in self.faults))
        (d / "exits.jsonl").write_text("".join(json.dumps(x) + "\n" for x in self.exits))
        (d / "metrics_timeline.jsonl").write_text("".join(json.dumps({"t": t, "port": 1, "page": page}) + "\n"
                                                          for t, page in self.timeline))
        return d


def figures(report: Report) -> dict[str, int]:
    return {f: report.totals[f] for f in FIGURES if report.totals[f]}


def test_a_consistent_run_has_every_figure_zero(tmp_path: Path) -> None:
    report = check(load(Run().write(tmp_path)))
    assert figures(report) == {}, render(report)
    assert "PASS" in render(report)


def test_a_fault_the_harness_could_not_carry_out_fails_the_run(tmp_path: Path) -> None:
    run = Run()
    run.faults = [{"n": 0, "kind": "busy", "target": None, "overlap": False, "start": T0, "end": T0,
                   "detail": {}, "error": "ConnectionError: refused"}]
    report = check(load(run.write(tmp_path)))
    assert figures(report) == {} and report.failed
    assert "fault #0 busy: ConnectionError: refused" in render(report)


def test_entries_the_final_stream_trimmed_come_from_the_tail(tmp_path: Path) -> None:
    report = check(load(Run().write(tmp_path, trimmed=25)))
    assert figures(report) == {}, render(report)
    # An entry the tail found gone after a failover is no entry: its plan is missing (silently: no count).
    run = Run()
    gone = run.find("c000001", LATE)["id"]
    report = check(load(run.write(tmp_path / "vanished", trimmed=25, vanished=(gone,))))
    assert figures(report) == {"silent": 1}, render(report)
    assert report.notes["vanished entries (read during the run from a master whose data did not survive)"] == 1


def test_the_tail_reads_the_new_masters_entries_below_the_old_masters_last_id(tmp_path: Path) -> None:
    """Found by seed 3 (Redis broker, down-after 5 s): after a BUSY spell past down-after the old master took
    writes (a split brain) with ids above the new master's entries of that moment; the tail read on from its
    last id on the new master and skipped those, so their plans looked silently missing while the counters
    (written with them) were higher than the stream. Two redis-servers stand for the two masters."""
    import redis

    from .chaos.collect import STREAM, StreamTail
    from .conftest import PrivateRedis, poll

    for name in ("old", "new"):
        (tmp_path / name).mkdir()
    old, new = (PrivateRedis(tmp_path / name).start() for name in ("old", "new"))
    try:
        # The new master has 200-0, written after it was promoted; the old one 300-0, written meanwhile (ids in
        # ms from now: the tail judges the entries of the last minute).
        now = int(time.time() * 1000)
        first, second, third = (f"{now + ms}-0" for ms in (100, 200, 300))
        for server, entries in ((old, [(first, "p1"), (third, "p3")]), (new, [(first, "p1"), (second, "p2")])):
            client = redis.Redis(port=server.port)
            for entry_id, plan in entries:
                client.xadd(STREAM, {"plan_id": plan, "obs_point": LATE}, id=entry_id)
        tail = StreamTail([], "chaos", 0, tmp_path / "tail.jsonl")
        named = [("127.0.0.1", old.port)]

        class Sentinels:
            def discover_master(self, _service: str) -> tuple[str, int]:
                return named[0]

        tail.sentinel = Sentinels()  # type: ignore[assignment]
        tail.start()
        poll(lambda: tail.read >= 2, timeout=10, what="the old master's two entries read")
        named[0] = ("127.0.0.1", new.port)  # the sentinels name the new master
        poll(lambda: second in (tmp_path / "tail.jsonl").read_text(), timeout=10, what="the new master's entry")
        tail.stopping.set()
        tail.join(5)
        lines = [json.loads(line) for line in (tmp_path / "tail.jsonl").read_text().splitlines()]
        assert {line["vanished"] for line in lines if "vanished" in line} == {third}
        final = [{"id": first, "fields": {"plan_id": "p1", "obs_point": LATE}},
                 {"id": second, "fields": {"plan_id": "p2", "obs_point": LATE}}]
        entries, vanished = merge_stream(final, lines)
        assert sorted(e["plan_id"] for e in entries) == ["p1", "p2"] and [e["plan_id"] for e in vanished] == ["p3"]

        # Back to the old master (now holding the new one's data), whose stream was trimmed meanwhile: an entry
        # older than its first one is trimmed, not vanished (the first rerun of seed 3 marked thousands so).
        client = redis.Redis(port=old.port, decode_responses=True)
        client.delete(STREAM)
        client.xadd(STREAM, {"plan_id": "p2", "obs_point": LATE}, id=second)
        tail = StreamTail([], "chaos", 0, tmp_path / "tail2.jsonl")
        tail.sentinel = Sentinels()  # type: ignore[assignment]
        tail.recent = {(first, "p1", LATE): None, (second, "p2", LATE): None}
        with open(tmp_path / "tail2.jsonl", "w") as out:
            tail.verify(client, out, old.port)
        assert not (tmp_path / "tail2.jsonl").read_text()
        assert tail.recent == {(second, "p2", LATE): None}
    finally:
        old.stop()
        new.stop()


def test_a_doubled_record(tmp_path: Path) -> None:
    run = Run()
    twin = dict(run.find("c000004", LATE))
    run.entries.append({**twin, "id": "1800000009999-0"})
    assert figures(check(load(run.write(tmp_path)))) == {"doubled": 1}


def test_a_dropped_entry_is_silently_missing_unless_a_count_accounts_for_it(tmp_path: Path) -> None:
    run = Run()
    run.entries.remove(run.find("c000005", LATE))  # counters follow the stream: only the plan is missing
    report = check(load(run.write(tmp_path / "a")))
    assert figures(report) == {"silent": 1}
    assert '"plan":"c000005"' in report.examples["silent"][0]
    # The same plan deferred, and the publisher thread counted it as refused: accounted for.
    run.calls = [{**c, "result": "deferred"} if (c["plan"], c["obs_point"]) == ("c000005", LATE) else c
                 for c in run.calls]
    run.extra_counts[("p28_observe_refused_total", f'cause="unavailable",obs_point="{LATE}"')] += 1
    assert figures(check(load(run.write(tmp_path / "b")))) == {}
    # Enqueued plans are admitted: no refusal count can account for them, only p28_late_obs_lost_total.
    run.calls = [{**c, "result": "enqueued"} if c["plan"] == "c000005" and c["obs_point"] == LATE else c
                 for c in run.calls]
    assert figures(check(load(run.write(tmp_path / "c")))) == {"silent": 1}
    run.extra_counts[("p28_late_obs_lost_total", "")] += 1
    assert figures(check(load(run.write(tmp_path / "d")))) == {}


def test_counts_are_matched_to_absent_plans_by_the_time_they_appeared(tmp_path: Path) -> None:
    """Two outages: the first one's deferred plan was given up and counted 2 s later; the second one's count
    was lost. Seen over time, the silent plan is the second outage's, whatever the call order says."""
    run = Run(plans=400)
    first, second = "c000040", "c000320"  # called at 1 s and at 8 s
    for plan in (first, second):
        run.entries.remove(run.find(plan, LATE))
        run.calls = [{**c, "result": "deferred"} if (c["plan"], c["obs_point"]) == (plan, LATE) else c
                     for c in run.calls]
    run.faults = [{"n": n, "kind": kind, "target": None, "overlap": False, "start": T0 + at, "end": T0 + at + 0.5,
                   "detail": {}, "error": None} for n, (kind, at) in enumerate((("master_kill", 0.9), ("busy", 7.9)))]
    series = f'p28_observe_refused_total{{cause="unavailable",obs_point="{LATE}"}}'
    run.extra_counts[("p28_observe_refused_total", f'cause="unavailable",obs_point="{LATE}"')] += 1
    run.timeline = [(T0 + 2.0, f"{series} 0.0\n"), (T0 + 3.0, f"{series} 1.0\n"), (T0 + 9.0, f"{series} 1.0\n")]
    report = check(load(run.write(tmp_path / "timeline")))
    assert figures(report) == {"silent": 1}
    assert report.rows["busy"]["silent"] == 1 and report.info["master_kill"]["counted"] == 1, render(report)
    # The same count seen only at the end: it goes to the latest claimant, and the first plan is silent.
    run.timeline = []
    report = check(load(run.write(tmp_path / "no timeline")))
    assert report.rows["master_kill"]["silent"] == 1 and report.info["busy"]["counted"] == 1, render(report)


def test_a_false_timeout(tmp_path: Path) -> None:
    run = Run()
    entry = run.find("c000007", LATE)  # heat acknowledged 0.4 s after the call
    entry["fields"].update(heat_reason="timeout", heat_found="0")
    report = check(load(run.write(tmp_path)))
    assert figures(report) == {"false_to": 1}, render(report)
    # Heat that HeatBridge's audit found gone from the final master (Redis lost it) excuses the timeout.
    run.heat.append({"plan": "c000007", "lost": True, "acked": "x", "found": None})
    assert figures(check(load(run.write(tmp_path / "lost")))) == {}
    run.heat.pop()
    # Heat acknowledged after the deadline (call + 2 s) is a true timeout.
    next(h for h in run.heat if h["plan"] == "c000007")["ack"] = T0 + 7 / 40 + 2.5
    assert figures(check(load(run.write(tmp_path / "late")))) == {}


def test_counters_off_by_one(tmp_path: Path) -> None:
    run = Run()
    run.extra_counts[("p28_heat_reason_total", f'obs_point="{LATE}",reason="timeout"')] += 1
    report = check(load(run.write(tmp_path)))
    assert figures(report) == {"counters": 1}
    assert "counter +11, stream 10" in report.examples["counters"][0]


def test_an_ok_without_heat(tmp_path: Path) -> None:
    run = Run()
    run.find("c000003", LATE)["fields"].update(heat_reason="ok", heat_found="1")  # no heat was ever written
    assert figures(check(load(run.write(tmp_path)))) == {"ok_no_heat": 1}


def test_a_slow_call_and_a_raised_one(tmp_path: Path) -> None:
    run = Run()
    run.calls[4]["dur"] = 0.071  # over 50 ms + 20 ms
    report = check(load(run.write(tmp_path / "slow")))
    assert figures(report) == {"slow": 1}
    assert report.max_ms["all"] == pytest.approx(71.0)
    run.calls[4]["dur"] = 0.069
    assert figures(check(load(run.write(tmp_path / "within")))) == {}
    run.calls[6]["raised"] = "RuntimeError('boom')"
    assert figures(check(load(run.write(tmp_path / "raised")))) == {"raised": 1}


def test_an_unexplained_worker_exit(tmp_path: Path) -> None:
    run = Run()
    run.exits = [{"worker": "w1", "pid": 1, "t": T0 + 0.1, "code": -9, "caused": True, "log": "w1-0.log"},
                 {"worker": "w2", "pid": 2, "t": T0 + 0.5, "code": 1, "caused": False, "log": "w2-0.log"}]
    run.faults = [{"n": 0, "kind": "worker_kill", "target": 0, "overlap": False, "start": T0, "end": T0 + 0.2,
                   "detail": {}, "error": None}]
    d = run.write(tmp_path)
    (d / "w2-0.log").write_text("ready\nUnrecoverable error: AttributeError('x')\n")
    report = check(load(d))
    assert figures(report) == {"exits": 1}
    assert report.rows["worker_kill"]["exits"] == 1  # the exit happened within the kill's reach
    assert "Unrecoverable error: AttributeError" in report.examples["exits"][0]


def test_a_lease_left(tmp_path: Path) -> None:
    run = Run()
    run.inflight = [["c000002", T0 * 1000 + 7000]]
    assert figures(check(load(run.write(tmp_path)))) == {"leases": 1}


def test_a_refused_plan_recorded(tmp_path: Path) -> None:
    run = Run()
    run.calls = [{**c, "result": "dropped"} if (c["plan"], c["obs_point"]) == ("c000001", LATE) else c
                 for c in run.calls]
    run.extra_counts[("p28_late_obs_dropped_total", "")] += 1
    assert figures(check(load(run.write(tmp_path)))) == {"refused_rec": 1}


def test_a_plan_belongs_to_the_fault_its_window_overlaps(tmp_path: Path) -> None:
    run = Run(plans=400)  # 10 s of plans; a stall from 4 s to 5 s reaches to 10 s (settle 5 s)
    run.faults = [{"n": 0, "kind": "master_stall", "target": None, "overlap": False, "start": T0 + 4,
                   "end": T0 + 5, "detail": {}, "error": None}]
    report = check(load(run.write(tmp_path)))
    late = {row: sum(n for k, n in c.items() if k.startswith("late:")) for row, c in report.info.items()}
    assert late == {"none": 80, "master_stall": 320}  # calls from 2 s on: their 2 s window meets the stall


def test_the_schedule_is_the_seeds() -> None:
    a, b = draw(7, 600, REDIS_KINDS, 5000), draw(7, 600, REDIS_KINDS, 5000)
    assert a == b and a != draw(8, 600, REDIS_KINDS, 5000)
    assert {f.kind for f in a[:len(REDIS_KINDS)]} == set(REDIS_KINDS)  # every kind once before any repeats
    for i, f in enumerate(a[1:], 1):  # one at a time unless the seed says so
        assert f.overlap or f.at >= max(p.at + p.duration for p in a[:i])
    assert any(f.overlap for f in a)


#: The short seed CI runs: 100 s of load with every kind of fault of the Redis broker (asserted below).
SHORT_SEED, SHORT_MINUTES, SHORT_GAPS = 4, 100 / 60, (2.0, 5.0)


@pytest.mark.slow
@pytest.mark.serial  # judges every call against its cap (+20 ms): alone, so the other tests' load cannot slow one
@pytest.mark.timeout(600)
def test_short_chaos_seed_has_every_figure_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from .chaos.soak import OBSERVER_VARS, Config, run

    if not shutil.which("redis-server"):
        cannot_run("redis-server is needed for the chaos soak")
    for name in [n for n in os.environ if OBSERVER_VARS.match(n)]:
        monkeypatch.delenv(name)  # workers inherit the environment: the soak sets every observer variable
    cfg = Config(seed=SHORT_SEED, minutes=SHORT_MINUTES, gap_s=SHORT_GAPS, run_dir=tmp_path / "run",
                 ports=os.environ.get("CHAOS_PORTS", os.environ.get("TEST_PRIVATE_PORTS", "7100-7199")))
    kinds = {f.kind for f in draw(cfg.seed, cfg.minutes * 60, REDIS_KINDS, cfg.down_after_ms, gap_s=cfg.gap_s)}
    assert kinds == set(REDIS_KINDS), f"seed {cfg.seed} no longer draws every kind of fault: {kinds}"
    report = run(cfg)
    assert not report.failed, render(report)
