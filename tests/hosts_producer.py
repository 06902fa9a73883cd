"""The producer host of tests/test_multihost.py: an apply layer calling observe_late and a fake HeatBridge.

Run as ``python -m tests.hosts_producer`` on the producer host (its wall clock possibly shifted). It reads
one JSON command per line on stdin and answers one JSON line on stdout:
- ``{"cmd": "round", "prefix": p, "heat": [true, false, ...], "gap_ms": 25, "heat_after_ms": 300}``:
  calls observe_late for plans ``{p}-00``, ``{p}-01``, ... one every gap_ms, and for each plan flagged
  true that was enqueued, HSETs its heat hash heat_after_ms after observe_late returned. Answers
  ``{"results": {plan: "enqueued" | ...}, "call_ms": {plan: ms}}`` once every plan is published.
- ``{"cmd": "quiet", "timeout_s": 10}``: waits until every scheduled heat write is done; answers
  ``{"written": n, "pending": 0, "late_ms": {plan: ms}}`` (how late each write started against its schedule).
Every time here is the monotonic clock: the schedule of the writes must not depend on the shifted wall
clock, which is the thing under test.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import sys
import threading
import time
from typing import Any

import redis

from observer_tasks import observe, observe_late
from observer_tasks.core.settings import Settings

from .timing import hold


class HeatBridge(threading.Thread):
    def __init__(self, url: str, prefix: str) -> None:
        super().__init__(name="heatbridge", daemon=True)
        self.client = redis.Redis.from_url(url, socket_timeout=2)
        self.client.client_setname("p28h:heatbridge")
        self.write = self.client.register_script(
            "local t = redis.call('TIME') "
            "redis.call('HSET', KEYS[1], 'ts_epoch', string.format('%d.%03d', t[1], math.floor(t[2] / 1000)), "
            "unpack(ARGV))")
        self.prefix = prefix
        self.due: list[tuple[float, str]] = []
        self.cond = threading.Condition()
        self.written = 0
        self.late_ms: dict[str, float] = {}  # how late each write started against its schedule

    def schedule(self, at: float, plan_id: str) -> None:
        with self.cond:
            heapq.heappush(self.due, (at, plan_id))
            self.cond.notify()

    def run(self) -> None:
        while True:
            with self.cond:
                while not self.due or self.due[0][0] > time.monotonic():
                    self.cond.wait(self.due[0][0] - time.monotonic() if self.due else None)
                at, plan_id = heapq.heappop(self.due)
            late_ms = round((time.monotonic() - at) * 1000, 2)  # when the write left: it lands ~0.2 ms later
            # ts_epoch is Redis TIME at the write, so the entry's heat_ts_epoch tells the observer's own lag.
            self.write(keys=[self.prefix + plan_id], args=[
                "symbol", "BTCUSDT", "plan_id", plan_id, "in_action", "FULL", "out_action", "FULL",
                "heat_level", "warm", "heat_score", "0.42", "heat_action", "NONE", "recommended_partial", "0",
                "reason", "multihost", "mode", "shadow"])
            with self.cond:
                self.written += 1
                self.late_ms[plan_id] = late_ms
                self.cond.notify_all()

    def quiet(self, timeout_s: float) -> dict[str, Any]:
        give_up = time.monotonic() + timeout_s
        with self.cond:
            while self.due and time.monotonic() < give_up:
                self.cond.wait(0.05)
            return {"written": self.written, "pending": len(self.due), "late_ms": dict(self.late_ms)}


def publish_round(bridge: HeatBridge, prefix: str, heat: list[bool], gap_ms: int, heat_after_ms: int) -> dict[str, Any]:
    results, call_ms = {}, {}
    start = time.monotonic()
    for i, flag in enumerate(heat):
        plan_id = f"{prefix}-{i:02d}"
        t0 = time.monotonic()
        results[plan_id] = observe_late(plan_id, "BTCUSDT", "EXECUTE")
        t1 = time.monotonic()
        call_ms[plan_id] = round((t1 - t0) * 1000, 2)
        if flag and results[plan_id] == "enqueued":
            # From the call's return (admission happened inside it; the producer is warmed up, so the
            # first call does not build connections after admitting).
            bridge.schedule(t1 + heat_after_ms / 1000, plan_id)
        pause = start + (i + 1) * gap_ms / 1000 - time.monotonic()
        if pause > 0:
            hold(pause, "pacing: one plan every gap_ms is the load under test, not a wait for a result")
    return {"results": results, "call_ms": call_ms}


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    prefix = Settings.from_env().heat_lookup_prefix
    bridge = HeatBridge(os.environ["REDIS_URL"], prefix)
    bridge.start()
    # Warm up (settings, Redis connection) with the early observer, whose entry the cases do not count.
    observe(f"warmup-{os.getpid()}", "BTCUSDT", "EXECUTE")
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "round":
            reply = publish_round(bridge, command["prefix"], command["heat"], command["gap_ms"],
                                  command["heat_after_ms"])
        elif command["cmd"] == "quiet":
            reply = bridge.quiet(command["timeout_s"])
        else:
            reply = {"error": f"unknown command {command['cmd']!r}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
