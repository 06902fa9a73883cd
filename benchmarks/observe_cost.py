"""The apply layer's cost of observe_late alone: no worker, no load, one caller thread.

    .venv/bin/python benchmarks/observe_cost.py [--calls 2000] [--profile]

Uses (and flushes) the benchmark databases 9 (data) and 10 (broker), like bench.py.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

import redis

DATA, BROKER = "redis://127.0.0.1:6379/9", "redis://127.0.0.1:6379/10"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--profile", action="store_true", help="also print the top of a cProfile of 500 calls")
    args = ap.parse_args()
    os.environ.update(REDIS_URL=DATA, CELERY_BROKER_URL=BROKER, P28_LATE_OBS_MAX_INFLIGHT="1000000")
    for url in (DATA, BROKER):
        redis.Redis.from_url(url).flushdb()
    from observer_tasks import observe_late

    observe_late("warm-up", "BTCUSDT")
    costs = []
    for i in range(args.calls):
        start = time.perf_counter()
        assert observe_late(f"c{i}", "BTCUSDT", "EXECUTE") == "enqueued"
        costs.append(time.perf_counter() - start)
    costs.sort()
    print(f"observe_late x{args.calls}: p50 {costs[len(costs) // 2] * 1e6:.0f} us, "
          f"p99 {costs[int(len(costs) * 0.99)] * 1e6:.0f} us, max {costs[-1] * 1e6:.0f} us")
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(lambda: [observe_late(f"p{i}", "BTCUSDT") for i in range(500)])
        pstats.Stats(profile).sort_stats("cumulative").print_stats(18)
    for url in (DATA, BROKER):
        redis.Redis.from_url(url).flushdb()


if __name__ == "__main__":
    main()
