"""Each ledger step's Redis time on an idle private redis-server, against the thread-pool pattern's commands.

    .venv/bin/python benchmarks/step_cost.py [--plans 2000]

bench.py measures the Redis load per plan under a real load, on two shared cores where a script preempted
mid-call counts its wait. This runs each step alone, one after another, on a redis-server of its own (a free
loopback port, stopped at the end) with nothing else on it, and reads INFO commandstats around each: the time
Redis itself spends, per plan, in the step's EVALSHA (its inner commands included) and the commands it runs.
The same for the replaced design's per-plan traffic (12 EXISTS, HGETALL, XADD of the heat's fields, SETEX),
and for the generated prologue and the shared library alone (a script that only returns), which every step pays.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench import PrivateRedis  # noqa: E402
from observer_tasks.core.ledger import Ledger  # noqa: E402
from observer_tasks.core.settings import Settings  # noqa: E402
from observer_tasks.core.steps import _SCRIPTS, STEPS, prologue  # noqa: E402


def measure(client: redis.Redis, name: str, run: Callable[[], object], plans: int) -> None:
    client.config_resetstat()
    run()
    stats = {k.removeprefix("cmdstat_"): v for k, v in client.info("commandstats").items()}
    stats.pop("config|resetstat", None)
    top = stats.get("evalsha") or {"usec": sum(v["usec"] for v in stats.values()), "calls": 0}
    inner = sorted((k, v["calls"] / plans) for k, v in stats.items() if k not in ("evalsha", "script|load"))
    print(f"{name:34s} {top['usec'] / plans:6.1f} us  {sum(v['calls'] for v in stats.values()) / plans:5.1f} "
          f"commands  " + " ".join(f"{k} {n:.2f}" for k, n in inner))


def write_heat(client: redis.Redis, prefix: str, plans: list[str]) -> None:
    for p in plans:  # the hash bench.py's HeatBridge writes
        client.hset(prefix + p, mapping={
            "ts_epoch": f"{time.time():.6f}", "plan_id": p, "symbol": "BTCUSDT", "heat_level": "cold",
            "heat_score": "0.1", "heat_action": "NONE", "out_action": "PARTIAL", "recommended_partial": "0.5",
            "reason": "bench", "mode": "shadow"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plans", type=int, default=2000)
    n = parser.parse_args().plans
    with tempfile.TemporaryDirectory() as workdir:
        server = PrivateRedis(0, Path(workdir), "steps")
        try:
            client = redis.Redis(port=server.port, decode_responses=True)
            settings = Settings.from_env({"REDIS_URL": server.url, "P28_LATE_OBS_MAX_INFLIGHT": str(2 * n)})
            ledger = Ledger(settings, client)
            plans = [f"plan-{i}" for i in range(n)]
            print(f"per plan, {n} plans, redis-server {client.info('server')['redis_version']} on an idle port")
            step = STEPS["admit"]
            for label, body in (("a script that only returns", "return 1"),
                                ("prologue + return", prologue(step) + "return 1"),
                                ("prologue + observe_lib + return",
                                 prologue(step) + _SCRIPTS.joinpath("observe_lib.lua").read_text() + "\nreturn 1")):
                sha = client.script_load(body)
                keys = ["k"] * len(step.keys)
                measure(client, label, lambda sha=sha, keys=keys: [
                    client.evalsha(sha, len(keys), *keys, *["1"] * len(step.args)) for _ in range(n)], n)
            measure(client, "admit", lambda: [ledger.admit(p, "BTCUSDT", "EXECUTE", token=p) for p in plans], n)
            admitted_at = time.monotonic()  # the last plan's deadline is MAX_WAIT_MS after this, at most
            with_heat, without = plans[: n * 7 // 10], plans[n * 7 // 10:]
            write_heat(client, settings.heat_lookup_prefix, with_heat)
            half = len(with_heat) // 2
            measure(client, "wake, one plan per batch", lambda: [ledger.wake([p]) for p in with_heat[:half]], half)
            rest = with_heat[half:]
            measure(client, "wake, ten plans per batch",
                    lambda: [ledger.wake(rest[i:i + 10]) for i in range(0, len(rest), 10)], len(rest))
            measure(client, "look before the deadline",
                    lambda: [ledger.look(p, 1, 0, int(time.time() * 1000) + 60_000) for p in without], len(without))
            last_deadline = admitted_at + (settings.late_obs_max_wait_ms + settings.late_obs_poll_ms) / 1000
            time.sleep(max(0.0, last_deadline + 0.2 - time.monotonic()))
            measure(client, "look at the deadline (timeout)",
                    lambda: [ledger.look(p, 2, 0, int(time.time() * 1000)) for p in without], len(without))
            client.flushdb()
            write_heat(client, settings.heat_lookup_prefix, plans)

            def threadpool() -> None:
                for i, p in enumerate(plans):
                    for _ in range(12):
                        client.exists(settings.heat_lookup_prefix + p)
                    heat = client.hgetall(settings.heat_lookup_prefix + p)
                    client.xadd("stream", {"plan_id": p, "heat_found": "1", **heat}, maxlen=10_000, approximate=True)
                    client.setex(f"dedupe:{i}", 3600, "1")
            measure(client, "thread-pool pattern", threadpool, n)
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
