"""The cases' side of the multi-host harness: one test's hosts (Cluster), what they recorded (Outcome),
and the invariants every case checks (check).

A case passes when every admitted plan has exactly one publish_plan_post entry, the counters equal the
stream, inflight is back to 0, and every plan the fault did not touch matches the unshifted baseline run:
the same reason and wait_ms within WAIT_TOLERANCE_MS. For a hit, wait_ms is compared net of when the fake
HeatBridge wrote (its ts_epoch is Redis TIME at the write): the observer's lag behind the write. With
compare_late (the producer-clock cases), the deciding look of a timeout must also come no later than the
baseline's (debug_json late_ms within WAIT_TOLERANCE_MS; a timeout's wait_ms is MAX_WAIT_MS by definition).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from observer_tasks.core import contract as C
from observer_tasks.core.settings import LATE_POINT, Settings
from tests.conftest import Counts, counters, inflight, late_entries, poll
from tests.hosts import Net, Proc

#: One round: 10 plans that get heat 300 ms after publish, 4 that never do.
HEAT = [True, True, True, False, True, True, True, False, True, True, False, True, True, False]
SETTINGS = {"P28_LATE_OBS_MAX_WAIT_MS": "1000", "P28_LATE_OBS_POLL_MS": "80", "P28_METRICS_PORT": "0"}
#: How far an untouched plan's wait_ms (a hit's lag behind its write) or a timeout's late_ms may differ from the
#: baseline's: one look interval, derived from the settings. A push the wake path handles late on the loaded
#: shared cores is at worst caught by the next look; a clock that counted would differ by its shift (>= 3 s),
#: and a lost wake path or a late chain by more than a look. Below that it is scheduling, not behaviour.
WAIT_TOLERANCE_MS = int(SETTINGS["P28_LATE_OBS_POLL_MS"])
#: Long enough for the sweeper (deadline + its grace) to record a plan whose message is lost.
SETTLE_S = 20.0
#: The Redis host's server is the module's own: these databases are the observer's data and the broker.
DATA_DB, BROKER_DB = 5, 6


class Producer:
    """Talks to tests/hosts_producer.py on the producer host: one JSON line per command and per reply."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc

    def send(self, **command: Any) -> dict[str, Any]:
        assert self.proc.proc.stdin and self.proc.proc.stdout
        self.proc.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.proc.stdin.flush()
        line = self.proc.proc.stdout.readline()
        assert line, f"producer exited:\n{self.proc.output()[-3000:]}"
        return dict(json.loads(line))

    def round(self, prefix: str, heat: list[bool], gap_ms: int = 25, heat_after_ms: int = 300) -> dict[str, Any]:
        """Publish one plan per flag (heat written heat_after_ms later when True); returns {plan: result}."""
        return self.send(cmd="round", prefix=prefix, heat=heat, gap_ms=gap_ms, heat_after_ms=heat_after_ms)

    def quiet(self, timeout_s: float = 10) -> dict[str, Any]:
        """Wait until every scheduled heat write is done."""
        return self.send(cmd="quiet", timeout_s=timeout_s)


@dataclass
class Outcome:
    name: str
    admitted: dict[str, str]  # plan -> observe_late result, for every plan published
    entries: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    counters: Counts = field(default_factory=Counts)
    inflight: int = 0
    figures: dict[str, Any] = field(default_factory=dict)
    #: How late the fake HeatBridge's write of each plan's heat was (ms, its own monotonic clock): on two
    #: shared cores it can lag by tens of ms, which is not the observer's doing, so comparisons subtract it.
    heat_late: dict[str, float] = field(default_factory=dict)

    def reason_wait(self, plan: str) -> tuple[str, int]:
        """The entry's reason and wait_ms, less the HeatBridge write's own lateness."""
        entry = self.entries[plan][0]
        return entry["heat_reason"], int(entry.get("wait_ms") or -1) - round(self.heat_late.get(plan, 0))

    def lag_ms(self, plan: str) -> int:
        """How long after the heat write (Redis TIME, stamped by the fake HeatBridge) the plan was recorded:
        the observer's own share of wait_ms, whatever the HeatBridge's scheduling on a loaded host did."""
        entry = self.entries[plan][0]
        return round((float(entry["ts_epoch"]) - float(entry["heat_ts_epoch"])) * 1000)

    def late_ms(self, plan: str) -> int:
        """How long after the deadline a timeout was recorded: wait_ms of a timeout is MAX_WAIT by
        definition, so this is where a late deciding look shows."""
        return int(json.loads(self.entries[plan][0]["debug_json"]).get("late_ms", 0))


class Cluster:
    """One test's hosts on the module's network: flushed databases, started processes, stopped at teardown."""

    def __init__(self, net: Net) -> None:
        self.net = net
        addr = net.addr("redis")
        base = {k: v for k, v in os.environ.items()
                if not (k.startswith("P28_") or k in ("REDIS_URL", "CELERY_BROKER_URL"))}
        self.env = {**base, **SETTINGS, "REDIS_URL": f"redis://{addr}:6379/{DATA_DB}",
                    "CELERY_BROKER_URL": f"redis://{addr}:6379/{BROKER_DB}"}
        self.data = redis.Redis(unix_socket_path=net.redis_sock, db=DATA_DB, socket_timeout=5)
        self.broker = redis.Redis(unix_socket_path=net.redis_sock, db=BROKER_DB, socket_timeout=5)
        self.data.flushdb()
        self.broker.flushdb()
        self.procs: list[Proc] = []
        self.cut: list[str] = []

    def workers(self, w1: str = "", w2: str = "", **env: str) -> list[Proc]:
        """Start both worker hosts at once (clock offsets w1, w2) and wait until both are ready."""
        procs = [self.net.worker(role, {**self.env, **env}, offset) for role, offset in (("w1", w1), ("w2", w2))]
        self.procs += procs
        for p in procs:
            self.net.wait_ready(p)
        # Ready for a case also means both wake listeners connected: until then chains poll at POLL_MS and a
        # look may record a hit before the wake step would (a slower start, not a different outcome).
        poll(lambda: len(self.data.hvals(C.WORKERS)) == 2
             and all(json.loads(raw).get("wake") == "connected" for raw in self.data.hvals(C.WORKERS))
             and self.data.exists(C.WAKE), 15, 0.05, "both wake listeners connected")
        return procs

    def producer(self, offset: str = "", **env: str) -> Producer:
        prod = Producer(self.net.producer({**self.env, **env}, offset))
        self.procs.append(prod.proc)
        return prod

    def settle(self, plans: list[str], timeout: float = SETTLE_S) -> float | None:
        """Seconds until every plan has an entry and inflight is 0; None if that never happened."""
        start = time.monotonic()
        try:
            poll(lambda: set(plans) <= {e["plan_id"] for e in late_entries(self.data)} and inflight(self.data) == 0,
                 timeout, 0.05, "every plan recorded")
        except AssertionError:
            return None
        return round(time.monotonic() - start, 2)

    def outcome(self, name: str, admitted: dict[str, str], heat_late: dict[str, float]) -> Outcome:
        out = Outcome(name, admitted, heat_late=heat_late)
        for entry in late_entries(self.data):
            out.entries.setdefault(entry["plan_id"], []).append(entry)
        out.counters = counters(self.data, Settings.from_env(self.env))
        out.inflight = inflight(self.data)
        return out

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()

    def close(self) -> None:
        self.stop()
        for role in self.cut:
            self.net.restore(role)
        self.data.close()
        self.broker.close()


def run_round(cluster: Cluster, prod: Producer, name: str) -> tuple[dict[str, str], float | None]:
    """One round; returns the observe_late results and the seconds it took to settle."""
    sent = prod.round(name, HEAT)["results"]
    return sent, cluster.settle([p for p, res in sent.items() if res == "enqueued"])


def check(out: Outcome, baseline: Outcome | None, touched: set[str] = frozenset(),  # type: ignore[assignment]
          compare_late: bool = False, tolerance_ms: int = WAIT_TOLERANCE_MS) -> dict[str, Any]:
    """The invariants of every case; returns its figures, fails with every problem found."""
    problems = []
    admitted = [p for p, res in out.admitted.items() if res == "enqueued"]
    for plan in admitted:
        if len(out.entries.get(plan, [])) != 1:
            problems.append(f"{plan}: {len(out.entries.get(plan, []))} entries")
    for plan in set(out.entries) - set(admitted):
        problems.append(f"{plan}: entry for a plan that was not admitted ({out.admitted.get(plan)})")
    stream = [e for es in out.entries.values() for e in es]
    for reason in {e["heat_reason"] for e in stream} | set(C.REASONS):
        n = sum(e["heat_reason"] == reason for e in stream)
        if out.counters("p28_heat_reason", LATE_POINT, reason) != n:
            problems.append(f"counter reason={reason} is {out.counters('p28_heat_reason', LATE_POINT, reason)}, "
                            f"stream has {n}")
    for found in ("0", "1"):
        n = sum((e["heat_reason"] == "ok") == (found == "1") for e in stream)
        if out.counters("p28_observed", LATE_POINT, found) != n:
            problems.append(f"counter heat_found={found} is {out.counters('p28_observed', LATE_POINT, found)}, "
                            f"stream has {n}")
    if out.inflight:
        problems.append(f"inflight is {out.inflight}")
    deltas: list[int] = []
    late_deltas: list[int] = []
    if baseline is not None:
        by_index = {p[-2:]: p for p in baseline.entries}
        for plan in sorted(set(admitted) - touched):
            if len(out.entries.get(plan, [])) != 1 or plan[-2:] not in by_index:
                continue
            base = by_index[plan[-2:]]
            (reason, wait), (b_reason, b_wait) = out.reason_wait(plan), baseline.reason_wait(base)
            if reason == b_reason == "ok":  # compare the observer's lag behind the write, both on Redis TIME
                wait, b_wait = out.lag_ms(plan), baseline.lag_ms(base)
            late, b_late = out.late_ms(plan), baseline.late_ms(base)
            deltas.append(wait - b_wait)
            late_deltas.append(late - b_late)
            late_off = abs(late - b_late) > tolerance_ms if compare_late else False
            if reason != b_reason or abs(wait - b_wait) > tolerance_ms or late_off:
                by = out.entries[plan][0].get("recorded_by")
                problems.append(f"{plan}: {reason} wait_ms={wait} late_ms={late} by {by}, "
                                f"baseline {b_reason} wait_ms={b_wait} late_ms={b_late}")
    reasons: dict[str, int] = {}
    for e in stream:
        reasons[e["heat_reason"]] = reasons.get(e["heat_reason"], 0) + 1
    figures = {"admitted": len(admitted), "entries": len(stream), "reasons": reasons, **out.figures}
    if out.heat_late:
        figures["heat_write_late_ms_max"] = max(out.heat_late.values())
    for reason in ("ok", "timeout"):
        waits = [int(e.get("wait_ms") or -1) for e in stream if e["heat_reason"] == reason]
        if waits:
            figures[f"wait_ms_{reason}"] = [min(waits), max(waits)]
    if deltas:
        figures["wait_delta_ms"] = [min(deltas), max(deltas)]
        figures["late_delta_ms"] = [min(late_deltas), max(late_deltas)]
    figures["recorded_by"] = {}
    for e in stream:
        figures["recorded_by"][e.get("recorded_by", "?")] = figures["recorded_by"].get(e.get("recorded_by", "?"), 0) + 1
    print(f"MULTIHOST {out.name} {json.dumps(figures, sort_keys=True)}")
    assert not problems, f"{out.name}: " + "; ".join(problems[:20]) + f" (figures: {figures})"
    return figures
