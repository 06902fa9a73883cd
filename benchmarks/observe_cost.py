"""What observe_late costs its caller, against the floor: one bare Redis round trip, in the same loop.

    .venv/bin/python benchmarks/observe_cost.py [--calls 3000] [--gap-ms 2] \\
        [--redis-url redis://127.0.0.1:6379/9] [--broker-url redis://127.0.0.1:6379/10] [--no-worker] [--profile]
        [--stall-ms 1000]

Each iteration, one every --gap-ms: a bare one-key script call (EVALSHA of a trivial script, the
least a call that must consult Redis can cost), then observe_late for a new plan, each timed on its
own; then (not timed) the plan's heat hash is written, as HeatBridge would, so the worker records
each plan once instead of polling it to its deadline. A real worker
(``celery -A observer_tasks worker -Q late_obs``) runs as a subprocess on the same databases, as in
production, unless --no-worker. Prints p50/p99/max of both and the ratios; the goal (issue 11) is
observe_late p50 <= 2.5x and p99 <= 3x the bare round trip. With P28_REPLICA_WAIT_MS set in the
environment each admission also waits for a replica (run it against a master with a replica).

With --stall-ms N, another client keeps the observer's Redis busy with a script for N ms halfway through
(as a long script or a fork would): the report then says what the callers got (how many calls were
deferred or refused, how many waited the per-call cap) and how many plans the worker recorded. Use a Redis
of the benchmark's own for that (a private redis-server): the stall stops every client of that server.

FLUSHES both databases given by --redis-url and --broker-url (FLUSHDB, at start and at the end);
nothing else is touched. The defaults are the benchmark databases 9 and 10, as for bench.py.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
CELERY = str(Path(sys.executable).with_name("celery"))
BARE = "return redis.call('EXISTS', KEYS[1])"
#: Keeps Redis busy for ARGV[1] ms (every other client waits, as for a long script or a fork).
BUSY = """
local t = redis.call('TIME')
local start = tonumber(t[1]) * 1000000 + tonumber(t[2])
repeat t = redis.call('TIME') until tonumber(t[1]) * 1000000 + tonumber(t[2]) - start >= tonumber(ARGV[1]) * 1000
"""


def start_worker(env: dict[str, str], data: redis.Redis) -> subprocess.Popen[bytes]:
    """A worker on the benchmark's databases, ready once its heartbeat is in Redis."""
    proc = subprocess.Popen(
        [CELERY, "-A", "observer_tasks", "worker", "-Q", "late_obs", "-n", f"cost-{uuid.uuid4().hex[:6]}@%h",
         "--loglevel", "warning"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        beats = [json.loads(v) for v in data.hvals("quantum:p28:workers")]
        if any(b.get("pid") == proc.pid for b in beats):
            return proc
        time.sleep(0.2)
    proc.kill()
    sys.exit(f"the worker did not become ready (exit code {proc.poll()})")


def percentile(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * q))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--gap-ms", type=float, default=2.0, help="time between iterations (ms)")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/9",
                    help="the observer's Redis database (FLUSHED at start and end)")
    ap.add_argument("--broker-url", default="redis://127.0.0.1:6379/10",
                    help="the broker's database (FLUSHED at start and end)")
    ap.add_argument("--no-worker", action="store_true", help="measure without a worker running")
    ap.add_argument("--profile", action="store_true", help="also print the top of a cProfile of 500 calls")
    ap.add_argument("--stall-ms", type=int, default=0,
                    help="keep the observer's Redis busy this long halfway through (a private Redis only)")
    args = ap.parse_args()
    if args.redis_url == args.broker_url:
        sys.exit("--redis-url and --broker-url must be different databases")
    env = {**os.environ, "REDIS_URL": args.redis_url, "CELERY_BROKER_URL": args.broker_url,
           "P28_LATE_OBS_MAX_INFLIGHT": "1000000", "P28_METRICS_PORT": "0"}
    os.environ.update(env)
    data = redis.Redis.from_url(args.redis_url)
    for url in (args.redis_url, args.broker_url):
        redis.Redis.from_url(url).flushdb()
    worker = None if args.no_worker else start_worker(env, data)
    try:
        measure(args, data)
    finally:
        if worker is not None:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(30)
        for url in (args.redis_url, args.broker_url):
            redis.Redis.from_url(url).flushdb()


def measure(args: argparse.Namespace, data: redis.Redis) -> None:
    from observer_tasks import observe_late
    from observer_tasks.core.connections import redis_client
    from observer_tasks.core.timings import CALL_TIMEOUT_S

    bare_client = redis_client(args.redis_url, CALL_TIMEOUT_S, "bench")  # the producer's client settings
    bare = bare_client.register_script(BARE)
    heat_prefix = "quantum:harvest:heat:by_plan:"
    for i in range(200):  # warm-up: clients, scripts, the publisher's connection
        with contextlib.suppress(redis.TimeoutError):
            bare(keys=["bench:bare"])
        observe_late(f"w{i}", "BTCUSDT")
    bare_s, late_s, results = [], [], []
    bare_timeouts = 0
    # HeatBridge's writes from a thread of their own: the timed loop must not wait on Redis (a stall) itself.
    heat_todo: queue.SimpleQueue[str | None] = queue.SimpleQueue()

    def heat_writer() -> None:
        while (plan := heat_todo.get()) is not None:
            data.hset(heat_prefix + plan, "heat_level", "warm")

    writer = threading.Thread(target=heat_writer, daemon=True)
    writer.start()
    staller = threading.Thread(target=lambda: redis.Redis.from_url(args.redis_url).eval(BUSY, 0, args.stall_ms),
                               daemon=True)
    start = time.monotonic()
    for i in range(args.calls):
        if args.stall_ms and i == args.calls // 2:
            staller.start()
        time.sleep(max(0.0, start + i * args.gap_ms / 1000 - time.monotonic()))
        t0 = time.perf_counter()
        try:
            bare(keys=["bench:bare"])
        except redis.TimeoutError:  # the floor waited its cap too (a stall, or this machine)
            bare_timeouts += 1
        t1 = time.perf_counter()
        results.append(observe_late(f"c{i}", "BTCUSDT", "EXECUTE"))
        t2 = time.perf_counter()
        bare_s.append(t1 - t0)
        late_s.append(t2 - t1)
        heat_todo.put(f"c{i}")
    took = time.monotonic() - start
    heat_todo.put(None)
    writer.join(30)
    enqueued = results.count("enqueued")
    if args.stall_ms:
        staller.join()
        print(f"{args.stall_ms} ms stall halfway: observe_late returned {dict(Counter(results))}; observe_late calls "
              f"that waited >= {CALL_TIMEOUT_S * 1000:.0f} ms: {sum(s >= CALL_TIMEOUT_S for s in late_s)}; "
              f"bare round trips that timed out: {bare_timeouts}")
    b50, b99, l50, l99 = (percentile(v, q) * 1000 for v in (bare_s, late_s) for q in (0.5, 0.99))
    print(f"{args.calls} iterations, {args.gap_ms:g} ms apart ({args.calls / took:.0f}/s), "
          f"worker {'off' if args.no_worker else 'on'}; observe_late returned enqueued {enqueued}/{args.calls}")
    print(f"bare round trip (EVALSHA, one key): p50 {b50:.3f} ms  p99 {b99:.3f} ms  max {max(bare_s) * 1000:.3f} ms")
    print(f"observe_late:                       p50 {l50:.3f} ms  p99 {l99:.3f} ms  max {max(late_s) * 1000:.3f} ms")
    p50_met, p99_met = ("met" if ok else "MISSED" for ok in (l50 / b50 <= 2.5, l99 / b99 <= 3))
    print(f"ratio observe_late / bare:          p50 {l50 / b50:.2f}x (goal <= 2.5x: {p50_met})"
          f"  p99 {l99 / b99:.2f}x (goal <= 3x: {p99_met})")
    counters = {k.decode(): int(v) for k, v in data.hgetall("quantum:p28:counters").items()}
    print(f"P28_REPLICA_WAIT_MS={os.environ.get('P28_REPLICA_WAIT_MS', '0')}: replicas "
          f"{data.info('replication').get('connected_slaves', 0)}, admissions no replica acknowledged "
          f"{counters.get('unreplicated|admit', 0)}")
    if not args.no_worker:
        deadline = time.monotonic() + 30
        total = 200 + args.calls
        while time.monotonic() < deadline and data.xlen("quantum:stream:apply.heat.observed") < total:
            time.sleep(0.2)
        print(f"recorded by the worker: {data.xlen('quantum:stream:apply.heat.observed')}/{total} plans")
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(lambda: [observe_late(f"p{i}", "BTCUSDT") for i in range(500)])
        pstats.Stats(profile).sort_stats("cumulative").print_stats(18)


if __name__ == "__main__":
    main()
