"""The checker's inputs, read from a run's folder: the files the soak wrote (collect.py, workers.py, faults.py,
apply.py, heatbridge.py) and nothing else. Synthetic runs in tests/test_chaos.py write the same files.

The stream is the final master's (``stream_final.jsonl``), completed with the entries the tail read before
the final stream's first entry (``stream_tail.jsonl``: the observer trims the stream to ~10 000 entries).
An entry the tail read that the final master does not hold, at or after that point, or that the tail itself
found gone after a change of master, has vanished (it was on a master whose data did not survive): kept
apart, as ``vanished``, and shown.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

Series = tuple[str, tuple[tuple[str, str], ...]]


@dataclass(frozen=True)
class Call:
    plan: str
    obs_point: str
    t: float
    dur: float
    result: str | None
    raised: str | None
    burst: int | None
    line: str


@dataclass(frozen=True)
class Window:
    kind: str
    start: float
    end: float


@dataclass
class Evidence:
    run_dir: Path
    settings: dict[str, Any]
    calls: list[Call] = field(default_factory=list)
    acks: dict[str, dict[str, Any]] = field(default_factory=dict)  # plan -> HeatBridge's acknowledged write
    failed_writes: dict[str, dict[str, Any]] = field(default_factory=dict)  # plan -> its failed write
    lost_writes: dict[str, dict[str, Any]] = field(default_factory=dict)  # acknowledged, then not on the master
    audit: dict[str, Any] | None = None
    entries: list[dict[str, str]] = field(default_factory=list)  # the stream (final master + tail), oldest first
    vanished: list[dict[str, str]] = field(default_factory=list)
    metrics_start: dict[Series, float] = field(default_factory=dict)
    metrics_end: dict[Series, float] | None = None  # None: no /metrics page was read
    timeline: list[tuple[float, dict[Series, float]]] = field(default_factory=list)  # counts seen during the run
    inflight: list[tuple[str, float]] = field(default_factory=list)
    faults: list[Window] = field(default_factory=list)
    fault_records: list[dict[str, Any]] = field(default_factory=list)
    exits: list[dict[str, Any]] = field(default_factory=list)

    def worker_log_tail(self, name: str, lines: int = 6) -> list[str]:
        """The worker's last critical line (Celery's ``Unrecoverable error: ...``), then its last lines."""
        path = self.run_dir / name
        if not path.exists():
            return [f"(no log {name})"]
        text = path.read_text(errors="replace").splitlines()
        critical = [line for line in text if "Unrecoverable error" in line] or \
            [line for line in text if "CRITICAL" in line]
        return critical[-1:] + ["..."] + text[-lines:] if critical else text[-lines:]


def jsonl(path: Path) -> list[tuple[dict[str, Any], str]]:
    if not path.exists():
        return []
    out = []
    for raw in path.read_text().splitlines():
        if raw.strip():
            try:
                out.append((json.loads(raw), raw))
            except ValueError:  # a line cut by a kill: not evidence
                continue
    return out


def parse_metrics(text: str) -> dict[Series, float]:
    values: dict[Series, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return values


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def merge_stream(final: list[dict[str, Any]], tail: list[dict[str, Any]]) -> tuple[list[dict[str, str]],
                                                                                   list[dict[str, str]]]:
    """(entries, vanished): the final stream, plus the tail's entries older than its first one. An entry is
    known by its id, plan and point (two masters can give two entries one id); one read twice counts once."""
    def key(e: dict[str, Any]) -> tuple[str, str, str]:
        fields = e.get("fields", e)
        return e["id"], fields.get("plan_id", ""), fields.get("obs_point", "")

    final_keys = {key(e) for e in final}
    first = _id(final[0]["id"]) if final else None
    # The tail saw them gone after a failover (a line without plan and point: only the id is known).
    marked = {(e["vanished"], e.get("plan_id"), e.get("obs_point")) for e in tail if "vanished" in e}
    marked_ids = {i for i, plan, _point in marked if plan is None}
    tail = [e for e in tail if "id" in e]
    older: list[dict[str, Any]] = []
    vanished: list[dict[str, Any]] = []
    seen: set[tuple[str, str, str]] = set()
    for e in tail:
        if key(e) in seen:
            continue
        seen.add(key(e))
        if (key(e) in marked or e["id"] in marked_ids) and key(e) not in final_keys:
            vanished.append(e)
        elif first is None or _id(e["id"]) < first:  # (no final stream read: the tail is all there is)
            older.append(e)
        elif key(e) not in final_keys:
            vanished.append(e)
    entries = [{**e["fields"], "_id": e["id"]} for e in older + final]
    return entries, [{**e["fields"], "_id": e["id"]} for e in vanished]


def load(run_dir: Path) -> Evidence:
    settings = json.loads((run_dir / "settings.json").read_text())
    ev = Evidence(run_dir, settings)
    for line, raw in jsonl(run_dir / "apply.jsonl"):
        if line.get("kind") == "call":
            ev.calls.append(Call(line["plan"], line["obs_point"], float(line["t"]), float(line["dur"]),
                                 line.get("result"), line.get("raised"), line.get("burst"), raw))
    for line, _raw in jsonl(run_dir / "heat.jsonl"):
        if "audit" in line:
            ev.audit = line
        elif line.get("lost"):
            ev.lost_writes[line["plan"]] = line
        elif line.get("failed"):
            ev.failed_writes[line["plan"]] = line
        else:
            ev.acks[line["plan"]] = line
    ev.entries, ev.vanished = merge_stream([x for x, _ in jsonl(run_dir / "stream_final.jsonl")],
                                           [x for x, _ in jsonl(run_dir / "stream_tail.jsonl")])
    start = run_dir / "metrics_start.prom"
    ev.metrics_start = parse_metrics(start.read_text()) if start.exists() else {}
    end = run_dir / "metrics_end.prom"
    text = end.read_text() if end.exists() else ""
    ev.metrics_end = parse_metrics(text) if text.strip() else None
    for line, _raw in jsonl(run_dir / "metrics_timeline.jsonl"):
        ev.timeline.append((float(line["t"]), parse_metrics(line["page"])))
    inflight = run_dir / "inflight.json"
    if inflight.exists():
        ev.inflight = [(str(m), float(s)) for m, s in json.loads(inflight.read_text())["members"]]
    for line, _raw in jsonl(run_dir / "faults.jsonl"):
        ev.fault_records.append(line)
        if line.get("start") is not None:
            ev.faults.append(Window(line["kind"], float(line["start"]), float(line["end"])))
    ev.exits = [line for line, _ in jsonl(run_dir / "exits.jsonl")]
    return ev
