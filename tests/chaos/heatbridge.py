"""The soak's HeatBridge stand-in (its own process): writes the heat hash of ~70% of the plans the apply process
publishes, a lognormal delay after the call (median ~400 ms), through a Sentinel-following redis-py client.

It learns the plans by tailing the apply process's log (``observe_late`` lines), so it depends on nothing the
observer writes. Each write is one Lua script that stamps ``ts_epoch`` with Redis ``TIME`` inside the write
and returns it, followed on the same connection by ``WAIT 1 20`` (how many replicas had it). Lines
(``heat.jsonl``), one per plan written:

- ``{"plan", "due", "ack" (Redis time of the acknowledged write), "replicas", "attempts", "ambiguous_before"}``
  when Redis acknowledged it;
- ``{"plan", "due", "failed": true, "error", "attempts", "ambiguous"}`` when every attempt until
  ``due + --retry-s`` failed: never logged as acknowledged. ``ambiguous``: some attempt may have reached
  Redis (a timeout or a connection lost after sending), so the hash may exist all the same; a refusal
  (``BUSY``, ``READONLY``, ``LOADING``) or a failed connect did not write.
- ``{"plan", "lost": true, "acked", "found"}`` from the audit at the end: every acknowledged write is read
  back from the master Sentinel names; one whose ``ts_epoch`` is not there was acknowledged by a master
  whose data did not survive (a failover before the replica had it, or a demoted master's split brain).
  ``{"audit": checked, "lost": n}`` closes the log.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from ..timing import hold

WRITE = """
local t = redis.call('TIME')
local ts = string.format('%d.%06d', t[1], t[2])
redis.call('HSET', KEYS[1], 'ts_epoch', ts, unpack(ARGV))
return ts
"""
PREFIX = "quantum:harvest:heat:by_plan:"
RETRY_EVERY_S = 0.05


def decide(seed: int, plan: str, fraction: float, median_ms: float, sigma: float) -> float | None:
    """The plan's heat delay in seconds, or None when HeatBridge never writes it (drawn from seed and plan)."""
    rng = random.Random(f"{seed}:{plan}")
    if rng.random() >= fraction:
        return None
    return median_ms / 1000 * math.exp(rng.gauss(0.0, sigma))


class Bridge:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        sentinels = [(h, int(p)) for h, p in (a.rsplit(":", 1) for a in args.sentinels.split(","))]
        timeouts: dict[str, Any] = {"socket_timeout": 0.2, "socket_connect_timeout": 0.2}
        self.client = Sentinel(sentinels, sentinel_kwargs=timeouts).master_for(
            args.service, db=args.db, retry=Retry(NoBackoff(), 0), **timeouts)
        self.due: list[tuple[float, str]] = []
        self.cond = threading.Condition()
        self.reading = True
        self.log = open(args.log, "a", buffering=1)  # noqa: SIM115 (closed in run)
        self.log_lock = threading.Lock()
        self.sentinels = sentinels
        self.acked: dict[str, str] = {}  # plan -> the ts_epoch its acknowledged write stamped

    def write_line(self, record: dict[str, Any]) -> None:
        with self.log_lock:
            self.log.write(json.dumps(record, separators=(",", ":")) + "\n")

    def tail(self) -> None:
        """Read the apply log as it grows; schedule each published plan's heat."""
        a = self.args
        with open(a.apply_log) as f:
            pending = ""
            while True:
                chunk = f.readline()
                if not chunk:
                    hold(0.005, "the apply log is read at this pace")
                    continue
                pending += chunk
                if not pending.endswith("\n"):
                    continue
                line, pending = json.loads(pending), ""
                if line.get("kind") == "end":
                    break
                if line.get("kind") != "call" or line["obs_point"] != "publish_plan_post":
                    continue
                delay = decide(a.seed, line["plan"], a.fraction, a.median_ms, a.sigma)
                if delay is not None:
                    with self.cond:
                        heapq.heappush(self.due, (line["t"] + delay, line["plan"]))
                        self.cond.notify()
        with self.cond:
            self.reading = False
            self.cond.notify()

    def write(self, plan: str, due: float) -> None:
        attempts, ambiguous, error = 0, False, ""
        while True:
            attempts += 1
            try:
                pipe = self.client.pipeline(transaction=False)
                pipe.eval(WRITE, 1, PREFIX + plan, "plan_id", plan, "symbol", "BTCUSDT", "in_action", "FULL",
                          "out_action", "PARTIAL", "heat_level", "hot", "heat_score", "0.8",
                          "heat_action", "DOWNGRADE_FULL_TO_PARTIAL", "recommended_partial", "0.5",
                          "reason", "chaos", "mode", "shadow")
                pipe.execute_command("WAIT", 1, 20)
                raw_ts, replicas = pipe.execute()
                ts = raw_ts.decode() if isinstance(raw_ts, bytes) else str(raw_ts)
                self.acked[plan] = ts
                self.write_line({"plan": plan, "due": due, "ack": float(ts), "replicas": int(replicas),
                                 "attempts": attempts, "ambiguous_before": ambiguous})
                return
            except redis.ResponseError as exc:  # refused before it ran: BUSY, READONLY, LOADING, ...
                error = f"{type(exc).__name__}: {exc}"
            except (redis.RedisError, OSError) as exc:
                error = f"{type(exc).__name__}: {exc}"
                ambiguous = ambiguous or "connecting" not in str(exc)  # a failed connect sent nothing
            if time.time() > due + self.args.retry_s:
                self.write_line({"plan": plan, "due": due, "failed": True, "error": error[:200],
                                 "attempts": attempts, "ambiguous": ambiguous})
                return
            hold(RETRY_EVERY_S, "a failed write is retried at this pace")

    def run(self) -> None:
        reader = threading.Thread(target=self.tail, name="heatbridge-tail", daemon=True)
        reader.start()
        with ThreadPoolExecutor(self.args.threads, thread_name_prefix="heatbridge-write") as pool:
            while True:
                with self.cond:
                    while not (self.due and self.due[0][0] <= time.time()) and (self.due or self.reading):
                        self.cond.wait(self.due[0][0] - time.time() if self.due else None)
                    if not self.due:
                        break  # the apply log ended and every write is handed out
                    due, plan = heapq.heappop(self.due)
                pool.submit(self.write, plan, due)
        self.audit()
        self.log.close()

    def audit(self, cap_s: float = 60.0) -> None:
        """Read every acknowledged write back from the master Sentinel names now (a fresh connection)."""
        deadline = time.time() + cap_s
        plans = sorted(self.acked)
        while True:
            try:
                host, port = Sentinel(self.sentinels, sentinel_kwargs={"socket_timeout": 0.5}).discover_master(
                    self.args.service)
                client = redis.Redis(host=host, port=port, db=self.args.db, socket_timeout=2, decode_responses=True)
                found: list[Any] = []
                for i in range(0, len(plans), 500):
                    pipe = client.pipeline(transaction=False)
                    for plan in plans[i:i + 500]:
                        pipe.hget(PREFIX + plan, "ts_epoch")
                    found += pipe.execute()
                break
            except (redis.RedisError, OSError):
                if time.time() > deadline:
                    self.write_line({"audit": 0, "lost": None, "error": "Redis unreachable"})
                    return
                hold(0.5, "the audit asks Redis again at this pace")
        lost = 0
        for plan, value in zip(plans, found, strict=True):
            if value != self.acked[plan]:
                lost += 1
                self.write_line({"plan": plan, "lost": True, "acked": self.acked[plan], "found": value})
        self.write_line({"audit": len(plans), "lost": lost})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.heatbridge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--apply-log", required=True, help="the apply process's log, tailed for plans")
    parser.add_argument("--log", required=True, help="this process's JSON-lines log")
    parser.add_argument("--sentinels", required=True, help="host:port,host:port,... of the sentinels")
    parser.add_argument("--service", default="mymaster", help="Sentinel's master name")
    parser.add_argument("--db", type=int, default=0, help="the observer's data database")
    parser.add_argument("--seed", type=int, default=0, help="which plans get heat, and their delays")
    parser.add_argument("--fraction", type=float, default=0.7, help="share of plans with heat (default 0.7)")
    parser.add_argument("--median-ms", type=float, default=400.0, help="median heat delay (default 400 ms)")
    parser.add_argument("--sigma", type=float, default=0.7, help="lognormal sigma of the delay (default 0.7)")
    parser.add_argument("--retry-s", type=float, default=10.0, help="retry a failed write until due + this")
    parser.add_argument("--threads", type=int, default=8, help="writer threads (default 8)")
    Bridge(parser.parse_args(argv)).run()


if __name__ == "__main__":
    main()
