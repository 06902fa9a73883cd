"""Blocking baseline vs observer_tasks, on the same seeded simulated load.

    .venv/bin/python benchmarks/bench.py [--quick] [--rates 10,50,100,150] [--seconds 20]

For each rate and side: FLUSHDB the two benchmark databases (--redis-url's and --broker-url's,
nothing else), publish ``rate * seconds`` plans at a fixed rate while a simulated HeatBridge
(its own process) writes each plan's heat hash after a seeded random delay (lognormal, or
never), wait for the observations to drain, then read the stream.

* baseline: the blocking design, in this process: ThreadPoolExecutor(MAX_WORKERS), each job
  loops EXISTS + sleep(POLL_MS) from its start until found or MAX_WAIT_MS, an in-process
  inflight counter capped at MAX_INFLIGHT; it writes the same stream entries (Store.record).
* observer_tasks: the real observe_late() here and a real
  ``celery -A observer_tasks worker -Q late_obs`` subprocess with its production settings.

Detection latency = entry ts_epoch (observation) - heat_ts_epoch (Redis TIME at the write).
Worker CPU = user+sys from /proc of the worker's process tree (baseline: its pool threads)
from the first publish to the end of the drain. Redis CPU = INFO cpu delta (the server is
shared: other clients' work is included). Coverage = hits / plans that got a heat hash.
Missing = admitted plans with no entry when the drain ends (MAX_WAIT_MS + --drain after the
last publish); for the baseline that is mostly its queue backlog.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import random
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CELERY = str(Path(sys.executable).with_name("celery"))
CLK_TCK = os.sysconf("SC_CLK_TCK")
SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT", "BNBUSDT")
# The HeatBridge's write: the whole hash, timestamped by Redis itself.
HEAT_LUA = """
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'ts_epoch', string.format('%d.%06d', tonumber(t[1]), tonumber(t[2])),
  'plan_id', ARGV[1], 'symbol', ARGV[2], 'heat_level', ARGV[3], 'heat_score', ARGV[4], 'heat_action', ARGV[5],
  'out_action', 'PARTIAL', 'recommended_partial', '0.5', 'reason', 'bench', 'mode', 'shadow')
redis.call('EXPIRE', KEYS[1], 600)
"""
HEATS = (("cold", "NONE"), ("warm", "DOWNGRADE_FULL_TO_PARTIAL"), ("hot", "HOLD_CLOSE"))


@dataclass(frozen=True)
class Plan:
    plan_id: str
    symbol: str
    decision: str
    at: float  # publish offset from the start of the load (s)
    heat_ms: float | None  # HeatBridge delay after publishing (ms), None = never


def make_plans(args: argparse.Namespace, rate: float) -> list[Plan]:
    """The same plans, publish times and heat delays for both sides (seeded per rate)."""
    rng = random.Random(f"{args.seed}:{rate}")
    plans = []
    for i in range(int(rate * args.seconds)):
        never = rng.random() < args.heat_never
        delay = args.heat_median_ms * math.exp(args.heat_sigma * rng.gauss(0.0, 1.0))
        plans.append(Plan(f"bench-{rate:g}-{i:06d}", rng.choice(SYMBOLS),
                          rng.choice(("EXECUTE", "EXECUTE", "SKIP", "BLOCKED")), i / rate, None if never else delay))
    return plans


def heat_bridge(redis_url: str, prefix: str, writes: list[tuple[float, str, str]], conn) -> None:
    """Child process: write each heat hash at t0 + offset (t0 arrives over the pipe)."""
    import redis

    script = redis.Redis.from_url(redis_url).register_script(HEAT_LUA)
    rng = random.Random(len(writes))
    conn.send("ready")
    t0 = conn.recv()
    for offset, plan_id, symbol in writes:
        delay = t0 + offset - time.time()
        if delay > 0:
            time.sleep(delay)
        level, action = rng.choice(HEATS)
        script(keys=[prefix + plan_id], args=[plan_id, symbol, level, f"{rng.random():.3f}", action])


# -- measurement helpers ----------------------------------------------------------------------
def proc_cpu(path: str) -> tuple[float, float]:
    """(user+sys, reaped children's user+sys) in seconds from a /proc/.../stat file."""
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK, (int(fields[13]) + int(fields[14])) / CLK_TCK


def tree_cpu(root: int) -> float:
    """CPU seconds of a process, its live descendants and its reaped children."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
        except OSError:
            continue
    total, stack = sum(proc_cpu(f"/proc/{root}/stat")), list(children.get(root, []))
    while stack:
        pid = stack.pop()
        try:
            total += proc_cpu(f"/proc/{pid}/stat")[0]
        except OSError:
            continue
        stack += children.get(pid, [])
    return total


def redis_cpu(client) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def dist(values: list[float], digits: int = 1) -> dict[str, float | None]:
    """Nearest-rank p50/p99/max (None without values)."""
    ordered = sorted(values)
    pick = lambda q: round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], digits) if ordered else None  # noqa: E731
    return {"p50": pick(0.50), "p99": pick(0.99), "max": pick(1.0)}


# -- the two sides ----------------------------------------------------------------------------
class Baseline:
    """The blocking design: a thread pool polling EXISTS, an in-process inflight counter."""

    def __init__(self, settings, store) -> None:
        self.s, self.store, self.lock = settings, store, threading.Lock()
        self.inflight, self.tids = 0, list[int]()
        self.pool = ThreadPoolExecutor(settings.late_obs_max_workers,
                                       initializer=lambda: self.tids.append(threading.get_native_id()))

    def observe_late(self, plan_id: str, symbol: str, decision: str) -> str:
        with self.lock:
            if self.inflight >= self.s.late_obs_max_inflight:
                return "dropped"
            self.inflight += 1
        self.pool.submit(self.job, plan_id, symbol, decision, int(time.time() * 1000))
        return "enqueued"

    def job(self, plan_id: str, symbol: str, decision: str, published_ms: int) -> None:
        from observer_tasks.heat import Heat, read_heat

        try:
            client, key = self.store.client, self.store.keys.heat(plan_id)
            start, polls = time.monotonic(), 1
            while not (found := client.exists(key)) and (time.monotonic() - start) * 1000 < self.s.late_obs_max_wait_ms:
                time.sleep(self.s.late_obs_poll_ms / 1000)
                polls += 1
            heat = read_heat(client.hgetall(key)) if found else Heat(False, "")
            wait_ms = int(time.time() * 1000) - published_ms
            self.store.record(plan_id=plan_id, symbol=symbol, obs_point="publish_plan_post", heat=heat,
                              reason=heat.reason if found else "timeout", apply_decision=decision,
                              debug={"polls": polls, "wait_ms": wait_ms},
                              extra={"wait_ms": str(wait_ms), "polls": str(polls)})
        finally:
            with self.lock:
                self.inflight -= 1

    def cpu(self) -> float:
        return sum(proc_cpu(f"/proc/{os.getpid()}/task/{tid}/stat")[0] for tid in list(self.tids))


def start_worker(args: argparse.Namespace, log_path: Path) -> subprocess.Popen:
    from observer_tasks import app

    cmd = [CELERY, "-A", "observer_tasks", "worker", "-Q", "late_obs", *shlex.split(args.worker_args)]
    with open(log_path, "a") as log:
        log.write(f"\n==== {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if app.control.ping(timeout=0.5):
            return proc
    stop_worker(proc)
    sys.exit(f"the worker did not become ready (exit code {proc.returncode}); see {log_path}")


def stop_worker(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # warm shutdown
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run(args: argparse.Namespace, side: str, rate: float, data, broker) -> dict:
    from observer_tasks import observe_late
    from observer_tasks.settings import Settings
    from observer_tasks.store import Store, redis_client

    settings, plans = Settings.from_env(), make_plans(args, rate)
    stream, prefix = settings.obs_stream, settings.heat_lookup_prefix
    for db in (data, broker):
        db.flushdb()
    worker = baseline = bridge = None
    try:
        if side == "baseline":
            baseline = Baseline(settings, Store(settings, redis_client(settings.redis_url, 0.5)))
            call: Any = baseline.observe_late
            cpu, warm = baseline.cpu, 0
        else:
            worker = start_worker(args, Path(args.json).parent / "worker.log")
            # Warm the producer up and check the round trip with a plan whose heat is already there.
            data.hset(prefix + "bench-warmup", mapping={"ts_epoch": f"{time.time():.6f}", "heat_level": "cold"})
            observe_late("bench-warmup", "BTCUSDT", "EXECUTE")
            t = time.monotonic()
            while data.xlen(stream) < 1 and time.monotonic() - t < 10:
                time.sleep(0.05)
            call, cpu, warm = observe_late, (lambda: tree_cpu(worker.pid)), data.xlen(stream)

        writes = sorted((p.at + p.heat_ms / 1000, p.plan_id, p.symbol) for p in plans if p.heat_ms is not None)
        ctx = multiprocessing.get_context("spawn")
        parent_end, child_end = ctx.Pipe()
        bridge = ctx.Process(target=heat_bridge, args=(settings.redis_url, prefix, writes, child_end), daemon=True)
        bridge.start()
        if not parent_end.poll(30):
            raise RuntimeError("the HeatBridge process did not start")
        parent_end.recv()

        returns: dict[str, int] = {}
        costs_us, max_lag, call_cpu_ns = [], 0.0, 0
        cpu0, redis0 = cpu(), redis_cpu(data)
        t0 = time.time() + 0.1
        parent_end.send(t0)
        for p in plans:  # the apply layer: publish at a fixed rate, timing the observer call
            delay = t0 + p.at - time.time()
            if delay > 0:
                time.sleep(delay)
            max_lag = max(max_lag, -delay)
            start, start_cpu = time.perf_counter_ns(), time.thread_time_ns()
            r = call(p.plan_id, p.symbol, p.decision)
            costs_us.append((time.perf_counter_ns() - start) / 1000)
            call_cpu_ns += time.thread_time_ns() - start_cpu
            returns[r] = returns.get(r, 0) + 1
        cap = time.monotonic() + settings.late_obs_max_wait_ms / 1000 + args.drain
        while data.xlen(stream) - warm < returns.get("enqueued", 0) and time.monotonic() < cap:
            time.sleep(0.05)
        cpu_s, redis_s = cpu() - cpu0, redis_cpu(data) - redis0
        entries = [{k.decode(): v.decode() for k, v in raw.items()} for _, raw in data.xrange(stream)]
    finally:
        if bridge:
            bridge.terminate()
        if worker:
            stop_worker(worker)
        if baseline:
            baseline.pool.shutdown(wait=True, cancel_futures=True)
    costs = {"observe_late_us": dist(costs_us), "observe_late_cpu_us": round(call_cpu_ns / 1000 / len(plans), 1)}
    return summarise(side, rate, args, plans, returns, entries, costs, cpu_s, redis_s, max_lag)


def summarise(side, rate, args, plans, returns, entries, costs, cpu_s, redis_s, max_lag) -> dict:
    ours = {p.plan_id for p in plans}
    seen: dict[str, int] = {}
    reasons: dict[str, int] = {}
    detect, timeout_wait, polls, swept = [], [], 0, 0
    for e in entries:
        if e["plan_id"] not in ours or e["obs_point"] != "publish_plan_post":
            continue
        seen[e["plan_id"]] = seen.get(e["plan_id"], 0) + 1
        reasons[e["heat_reason"]] = reasons.get(e["heat_reason"], 0) + 1
        polls += int(e.get("polls") or 0)
        swept += '"swept":true' in e["debug_json"]
        if e["heat_found"] == "1":
            detect.append((float(e["ts_epoch"]) - float(e["heat_ts_epoch"])) * 1000)
        elif e["heat_reason"] == "timeout":
            timeout_wait.append(float(e.get("wait_ms") or 0))
    admitted, with_heat = returns.get("enqueued", 0), sum(p.heat_ms is not None for p in plans)
    per = lambda n: round(cpu_s * 1000 / n, 3) if n else None  # noqa: E731
    return {
        "side": side, "rate": rate, "seconds": args.seconds, "published": len(plans), "admitted": admitted,
        "dropped": returns.get("dropped", 0), "returns": returns, "observed": len(seen),
        "missing": admitted - len(seen), "duplicates": sum(n - 1 for n in seen.values()), "swept": swept,
        "reasons": reasons, "hits": len(detect), "with_heat": with_heat,
        "coverage": round(len(detect) / with_heat, 4) if with_heat else None,
        "detect_ms": dist(detect), "timeout_wait_ms": dist(timeout_wait, 0),
        "polls": polls, "polls_per_plan": round(polls / len(seen), 2) if seen else None,
        "worker_cpu_ms": round(cpu_s * 1000), "worker_cpu_ms_per_plan": per(admitted),
        "worker_cpu_ms_per_poll": per(polls), "redis_cpu_ms": round(redis_s * 1000),
        **costs, "publisher_max_lag_ms": round(max_lag * 1000, 1),
    }


# -- report -----------------------------------------------------------------------------------
COLUMNS = (  # header, result key ("a.b" = nested), scale (None: as is), decimals
    ("side", "side", None, 0), ("rate", "rate", 1, 0), ("pub", "published", None, 0), ("adm", "admitted", None, 0),
    ("drop", "dropped", None, 0), ("miss", "missing", None, 0), ("dup", "duplicates", None, 0),
    ("cov%", "coverage", 100, 1), ("det50", "detect_ms.p50", 1, 0), ("det99", "detect_ms.p99", 1, 0),
    ("detmax", "detect_ms.max", 1, 0), ("to50", "timeout_wait_ms.p50", 1, 0), ("to99", "timeout_wait_ms.p99", 1, 0),
    ("polls/p", "polls_per_plan", 1, 1), ("cpu/plan", "worker_cpu_ms_per_plan", 1, 2),
    ("cpu/poll", "worker_cpu_ms_per_poll", 1, 3), ("redis", "redis_cpu_ms", None, 0),
    ("obs50us", "observe_late_us.p50", 1, 0), ("obs99us", "observe_late_us.p99", 1, 0),
    ("obsCPUus", "observe_late_cpu_us", 1, 0),
)
LEGEND = ("det = detection latency ms (observation ts - heat ts, hits); to = wait ms of timeouts;\n"
          "polls/p = polls per plan; cpu = worker CPU ms; redis = Redis CPU ms;\n"
          "obs = observe_late in the caller: wall p50/p99 and mean CPU (us)")


def cell(row: dict, key: str, scale: float | None, digits: int) -> str:
    value: Any = row
    for part in key.split("."):
        value = value[part]
    if scale is None or value is None:
        return "-" if value is None else str(value)
    return f"{value * scale:.{digits}f}"


def table(rows: list[dict]) -> str:
    cells = [[h for h, *_ in COLUMNS]] + [[cell(r, *spec) for _, *spec in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join([" ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in cells] + [LEGEND])


def target_misses(rows: list[dict]) -> list[str]:
    """The issue's targets for observer_tasks (meant for the default settings): one line per miss."""
    misses = []
    for r in (r for r in rows if r["side"] == "observer_tasks"):
        det = r["detect_ms"]
        wanted = [("worker CPU <= 2.0 ms per poll", (r["worker_cpu_ms_per_poll"] or 0) <= 2.0),
                  ("observe_late p99 <= 1000 us", r["observe_late_us"]["p99"] <= 1000)]
        if r["rate"] == 50:
            wanted += [("no drops, missing or duplicates", r["dropped"] + r["missing"] + r["duplicates"] == 0),
                       ("detection p50 <= 55 ms", (det["p50"] or 0) <= 55),
                       ("detection p99 <= 110 ms", (det["p99"] or 0) <= 110)]
        if r["rate"] == 100:
            wanted.append(("detection p99 <= 200 ms", (det["p99"] or 0) <= 200))
        misses += [f"observer_tasks @ {r['rate']:g}/s missed: {what}" for what, ok in wanted if not ok]
    return misses


def machine(data) -> dict:
    import celery
    import kombu
    import redis

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    return {"nproc": len(os.sched_getaffinity(0)), "loadavg": os.getloadavg(),
            "cpu_model": next((x.split(":", 1)[1].strip() for x in cpuinfo if x.startswith("model name")), "?"),
            "python": platform.python_version(), "celery": celery.__version__, "kombu": kombu.__version__,
            "redis_py": redis.__version__, "redis_server": data.info("server")["redis_version"],
            "git": git.strip(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="10,50,100,150", help="plans/s, comma separated")
    ap.add_argument("--seconds", type=float, default=20.0, help="load duration per rate")
    ap.add_argument("--quick", action="store_true", help="rates 10,50,100,150 for 4 s each, --drain 1 (~80 s)")
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/latest.json"))
    ap.add_argument("--seed", type=int, default=28)
    ap.add_argument("--sides", default="baseline,observer_tasks")
    ap.add_argument("--heat-median-ms", type=float, default=400.0)
    ap.add_argument("--heat-sigma", type=float, default=0.6, help="lognormal sigma of the heat delay")
    ap.add_argument("--heat-never", type=float, default=0.3, help="fraction of plans that never get heat")
    ap.add_argument("--drain", type=float, default=3.0, help="s to wait past the last plan's MAX_WAIT_MS")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/9", help="data db (FLUSHDB before each run)")
    ap.add_argument("--broker-url", default="redis://127.0.0.1:6379/10", help="broker db (FLUSHDB before each run)")
    ap.add_argument("--worker-args", default="", help="extra celery worker options (experiments only)")
    args = ap.parse_args(argv)
    if args.quick:
        args.rates, args.seconds, args.drain = "10,50,100,150", 4.0, 1.0
    if set(args.sides.split(",")) - {"baseline", "observer_tasks"}:
        ap.error("--sides takes baseline and/or observer_tasks")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Before importing observer_tasks: celeryconfig reads the environment when it is imported.
    os.environ.update(REDIS_URL=args.redis_url, CELERY_BROKER_URL=args.broker_url, P28_METRICS_PORT="0")
    import redis

    from observer_tasks.settings import Settings

    settings = Settings.from_env()
    data, broker = redis.Redis.from_url(args.redis_url), redis.Redis.from_url(args.broker_url)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": machine(data), "args": vars(args), "settings": settings.as_env()}
    print(f"# {meta['machine']}\n# {settings.startup_lines()[1]}", flush=True)
    rows = []
    for rate in (float(r) for r in args.rates.split(",")):
        for side in args.sides.split(","):
            t = time.monotonic()
            rows.append(run(args, side, rate, data, broker))
            print(f"# {side} @ {rate:g}/s done in {time.monotonic() - t:.1f}s", flush=True)
    for db in (data, broker):
        db.flushdb()
    misses = target_misses(rows)
    print(table(rows), *(misses or ["# observer_tasks met every target"]), sep="\n")
    Path(args.json).write_text(json.dumps({"meta": meta, "results": rows, "target_misses": misses}, indent=2))
    print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
