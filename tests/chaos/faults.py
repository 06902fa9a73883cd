"""Carrying out the schedule: each fault in its own thread, at its time, and its window recorded.

The record (``faults.jsonl``), one line per fault: ``{"n", "kind", "target", "overlap", "start", "end",
"detail", "error"}`` with ``start`` and ``end`` on the host's clock (time.time(), the clock the apply log and
Redis's TIME share on this machine). ``start`` is when the fault began (the signal sent, the script sent, the
proxy stopped); ``end`` when it is over from the harness's side: the worker restarted and serving /metrics,
SIGCONT sent, SCRIPT KILL answered, the old master back as an in-sync replica, the burst's last call returned,
the proxy listening again. A fault that would end inside the run's tail is skipped (recorded as such).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from ..conftest import poll
from .cluster import ChaosCluster
from .schedule import Fault
from .tcpproxy import TcpProxy
from .workers import Workers


class FaultRunner:
    def __init__(self, cluster: ChaosCluster, workers: Workers, proxy: TcpProxy | None, apply_pid: int,
                 run_dir: Path, load_start: float, load_end: float, tail_s: float) -> None:
        self.cluster, self.workers, self.proxy = cluster, workers, proxy
        self.apply_pid, self.apply_log = apply_pid, run_dir / "apply.jsonl"
        self.record_path = run_dir / "faults.jsonl"
        self.load_start, self.load_end, self.tail_s = load_start, load_end, tail_s
        self.bursts = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def run(self, faults: list[Fault]) -> None:
        """Carry out the schedule in order; returns when every fault has ended."""
        running: list[threading.Thread] = []
        prev_start = self.load_start
        for f in faults:
            if f.overlap:
                start_at = prev_start + f.offset
            else:
                for thread in running:
                    thread.join()
                running = []
                start_at = self.load_start + f.at if f.n == 0 else time.time() + f.gap
            if start_at + f.duration > self.load_end - self.tail_s:
                self.write({"n": f.n, "kind": f.kind, "target": f.target, "overlap": f.overlap, "start": None,
                            "end": None, "detail": {"skipped": "it would end inside the run's tail"}, "error": None})
                continue
            if self.stopping.wait(max(0.0, start_at - time.time())):  # the schedule's timing
                break
            prev_start = time.time()
            thread = threading.Thread(target=self.execute, args=(f,), name=f"chaos-fault-{f.n}", daemon=True)
            thread.start()
            running.append(thread)
        for thread in running:
            thread.join()

    def execute(self, f: Fault) -> None:
        start = time.time()
        detail: dict[str, Any] = {}
        error = None
        try:
            detail = self.do(f)
            start = detail.pop("start", start)
        except Exception as exc:  # recorded: the checker shows it beside the figures
            error = f"{type(exc).__name__}: {exc}"
        self.write({"n": f.n, "kind": f.kind, "target": f.target, "overlap": f.overlap, "start": start,
                    "end": detail.pop("end", time.time()), "detail": detail, "error": error})

    def do(self, f: Fault) -> dict[str, Any]:
        t, d = f.target, f.duration
        if f.kind == "worker_kill":
            assert t is not None
            detail = self.workers.kill(t)
            self.stopping.wait(d)  # the worker stays dead this long
            return {**detail, "restarted": self.workers.restart(t)}
        if f.kind == "worker_stop":
            assert t is not None
            detail = self.workers.signal_group(t, signal.SIGSTOP)
            try:
                self.stopping.wait(d)  # the stop itself
            finally:
                self.workers.signal_group(t, signal.SIGCONT)
            return detail
        if f.kind in ("master_stall", "master_kill", "busy"):
            waited = self.cluster.wait_healthy() if not f.overlap else None  # overlaps take the group as it is
            start = time.time()
            detail = self.cluster.stall(d) if f.kind == "master_stall" else \
                self.cluster.kill_and_fail_over() if f.kind == "master_kill" else self.cluster.busy(d)
            return {**detail, "start": start, "waited_for_healthy_s": waited}
        if f.kind == "burst":
            return self.burst()
        if f.kind == "broker_stop":
            assert self.proxy is not None
            reset = self.proxy.stop()
            try:
                self.stopping.wait(d)  # the broker is away this long
            finally:
                self.proxy.start()
            return {"connections_reset": reset}
        raise ValueError(f"unknown fault kind {f.kind!r}")

    def burst(self) -> dict[str, Any]:
        with self.lock:
            n, self.bursts = self.bursts, self.bursts + 1
        start = time.time()
        offset = self.apply_log.stat().st_size  # the burst's line comes after what is written now
        os.kill(self.apply_pid, signal.SIGUSR1)
        line = poll(lambda: self.burst_line(n, offset), 60, 0.1, f"burst {n} in the apply log")
        return {"start": start, "end": line["end"], "burst": n, "plans": line["plans"]}

    def burst_line(self, n: int, offset: int) -> dict[str, Any] | None:
        with open(self.apply_log) as f:
            f.seek(offset)
            f.readline()  # the offset may fall inside a line
            for raw in f:
                if raw.startswith('{"kind":"burst"') and raw.endswith("\n"):
                    line = json.loads(raw)
                    if line["n"] == n:
                        return dict(line)
        return None

    def write(self, record: dict[str, Any]) -> None:
        with self.lock, open(self.record_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        when = "skipped" if record["start"] is None else \
            f"{record['start'] - self.load_start:.1f}-{record['end'] - self.load_start:.1f} s"
        target = f" w{record['target'] + 1}" if record["target"] is not None else ""
        error = f" ERROR {record['error']}" if record["error"] else ""
        print(f"CHAOS fault #{record['n']} {record['kind']}{target} {when} {json.dumps(record['detail'])}{error}",
              flush=True)
