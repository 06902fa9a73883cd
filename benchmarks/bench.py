"""Blocking baseline vs observer_tasks, on the same seeded simulated load.

    .venv/bin/python benchmarks/bench.py [--quick] [--rates 10,50,100,150] [--seconds 20]

For each rate and side: flush the two benchmark databases (FLUSHDB on --redis-url's and
--broker-url's db, nothing else), publish ``rate * seconds`` plans at a fixed rate while a
simulated HeatBridge (its own process) writes each plan's heat hash after a seeded random
delay (lognormal, or never), wait for the observations to drain, then read the stream.

* baseline: the blocking design, in this process: ThreadPoolExecutor(MAX_WORKERS), each job
  loops EXISTS + sleep(POLL_MS) from its start until found or MAX_WAIT_MS, an in-process
  inflight counter capped at MAX_INFLIGHT; it writes the same stream entries (Store.record).
* observer_tasks: the real observe_late() here and a real
  ``celery -A observer_tasks worker -Q late_obs`` subprocess with its production settings.

Detection latency = entry ts_epoch (observation) - heat_ts_epoch (Redis TIME at the write).
Worker CPU = user+sys of the worker process tree (or the baseline's pool threads) over the
window from the first publish to the end of the drain, from /proc. Redis CPU = INFO cpu delta
(the server is shared: other clients' work is included). Coverage = hits / plans that got a
heat hash (catchable = those written within MAX_WAIT_MS of publishing, in the JSON).
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

ROOT = Path(__file__).resolve().parent.parent
CELERY = str(Path(sys.executable).with_name("celery"))
CLK_TCK = os.sysconf("SC_CLK_TCK")
SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT", "BNBUSDT")
# The HeatBridge's write: the hash, timestamped by Redis itself.
HEAT_LUA = """
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'ts_epoch', string.format('%d.%06d', tonumber(t[1]), tonumber(t[2])),
  'plan_id', ARGV[1], 'symbol', ARGV[2], 'heat_level', ARGV[3], 'heat_score', ARGV[4], 'heat_action', ARGV[5],
  'out_action', ARGV[6], 'recommended_partial', ARGV[7], 'reason', 'bench', 'mode', 'shadow')
redis.call('EXPIRE', KEYS[1], 600)
"""


@dataclass(frozen=True)
class Plan:
    plan_id: str
    symbol: str
    decision: str
    at: float  # publish offset from the start of the load (s)
    heat_ms: float | None  # HeatBridge delay after publishing (ms), None = never


def make_plans(args: argparse.Namespace, rate: float) -> list[Plan]:
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

    client = redis.Redis.from_url(redis_url)
    script = client.register_script(HEAT_LUA)
    rng = random.Random(len(writes))
    conn.send("ready")
    t0 = conn.recv()
    for offset, plan_id, symbol in writes:
        delay = t0 + offset - time.time()
        if delay > 0:
            time.sleep(delay)
        level, action = rng.choice((("cold", "NONE"), ("warm", "DOWNGRADE_FULL_TO_PARTIAL"), ("hot", "HOLD_CLOSE")))
        script(keys=[prefix + plan_id], args=[plan_id, symbol, level, f"{rng.random():.3f}", action, "PARTIAL", "0.5"])


# -- measurement helpers ----------------------------------------------------------------------
def proc_cpu(pid: int, task: int | None = None) -> tuple[float, float]:
    """(user+sys, reaped children's user+sys) in seconds from /proc/<pid>[/task/<tid>]/stat."""
    path = f"/proc/{pid}/task/{task}/stat" if task else f"/proc/{pid}/stat"
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()  # the name may contain spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK, (int(fields[13]) + int(fields[14])) / CLK_TCK


def tree_cpu(root: int) -> float:
    """CPU seconds of a process and all its live descendants, plus its reaped children."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                parents.setdefault(ppid, []).append(int(entry))
            except OSError:
                continue
    own, reaped = proc_cpu(root)
    total, stack = own + reaped, list(parents.get(root, []))
    while stack:
        pid = stack.pop()
        try:
            total += proc_cpu(pid)[0]
        except OSError:
            continue
        stack += parents.get(pid, [])
    return total


def redis_cpu(client) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def dist(values: list[float], digits: int = 1) -> dict[str, float | None]:
    return {k: (None if v is None else round(v, digits))
            for k, v in (("p50", pct(values, 50)), ("p99", pct(values, 99)), ("max", pct(values, 100)))}


# -- the two sides ----------------------------------------------------------------------------
class Baseline:
    """The blocking design: a 4-thread pool polling EXISTS, an in-process inflight counter."""

    def __init__(self, settings, store) -> None:
        self.s, self.store, self.lock = settings, store, threading.Lock()
        self.inflight, self.tids = 0, []
        self.pool = ThreadPoolExecutor(settings.late_obs_max_workers, initializer=self._register)

    def _register(self) -> None:
        self.tids.append(threading.get_native_id())

    def observe_late(self, plan_id: str, symbol: str, decision: str) -> str:
        with self.lock:
            if self.inflight >= self.s.late_obs_max_inflight:
                return "dropped"
            self.inflight += 1
        self.pool.submit(self.job, plan_id, symbol, decision, int(time.time() * 1000))
        return "enqueued"

    def job(self, plan_id: str, symbol: str, decision: str, published_ms: int) -> None:
        from observer_tasks.heat import Heat, read_heat
        from observer_tasks.keys import OBS_LATE

        try:
            client, key = self.store.client, self.store.keys.heat(plan_id)
            start, polls, found = time.monotonic(), 0, False
            while True:
                polls += 1
                if client.exists(key):
                    found = True
                    break
                if (time.monotonic() - start) * 1000 >= self.s.late_obs_max_wait_ms:
                    break
                time.sleep(self.s.late_obs_poll_ms / 1000)
            heat = read_heat(client.hgetall(key)) if found else Heat(False, "")
            wait_ms = int(time.time() * 1000) - published_ms
            self.store.record(plan_id=plan_id, symbol=symbol, obs_point=OBS_LATE, heat=heat,
                              reason=heat.reason if found else "timeout", apply_decision=decision,
                              debug={"polls": polls, "wait_ms": wait_ms},
                              extra={"wait_ms": str(wait_ms), "polls": str(polls)})
        finally:
            with self.lock:
                self.inflight -= 1

    def cpu(self) -> float:
        return sum(proc_cpu(os.getpid(), tid)[0] for tid in list(self.tids))


def start_worker(args: argparse.Namespace, log_path: Path) -> subprocess.Popen:
    from observer_tasks import app

    cmd = [CELERY, "-A", "observer_tasks", "worker", "-Q", "late_obs", *shlex.split(args.worker_args)]
    log = open(log_path, "a")
    log.write(f"\n==== {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"worker exited with {proc.returncode}; see {log_path}")
        if app.control.ping(timeout=0.5):
            return proc
    stop_worker(proc)
    sys.exit(f"worker not ready after 60 s; see {log_path}")


def stop_worker(proc: subprocess.Popen) -> None:
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

    settings = Settings.from_env()
    prefix = settings.heat_lookup_prefix
    plans = make_plans(args, rate)
    data.flushdb()
    broker.flushdb()
    worker = baseline = bridge = None
    try:
        if side == "baseline":
            baseline = Baseline(settings, Store(settings, redis_client(settings.redis_url, 0.5)))
            call, cpu = baseline.observe_late, baseline.cpu
        else:
            worker = start_worker(args, Path(args.json).parent / "worker.log")
            # Warm up the producer and check the round trip with a plan whose heat is already there.
            data.hset(prefix + "bench-warmup", mapping={"ts_epoch": f"{time.time():.6f}", "heat_level": "cold"})
            observe_late("bench-warmup", "BTCUSDT", "EXECUTE")
            t = time.monotonic()
            while data.xlen(settings.obs_stream) < 1 and time.monotonic() - t < 10:
                time.sleep(0.05)
            call, cpu = observe_late, (lambda: tree_cpu(worker.pid))

        # The HeatBridge process writes the same heats at the same offsets for both sides.
        writes = sorted((p.at + p.heat_ms / 1000, p.plan_id, p.symbol) for p in plans if p.heat_ms is not None)
        ctx = multiprocessing.get_context("spawn")
        parent_end, child_end = ctx.Pipe()
        bridge = ctx.Process(target=heat_bridge, args=(settings.redis_url, prefix, writes, child_end), daemon=True)
        bridge.start()
        if not parent_end.poll(30):
            raise RuntimeError("the HeatBridge process did not start")
        parent_end.recv()

        results: dict[str, int] = {}
        costs_us, max_lag = [], 0.0
        cpu0, redis0 = cpu(), redis_cpu(data)
        t0 = time.time() + 0.1
        parent_end.send(t0)
        for p in plans:  # the apply layer: publish at a fixed rate, timing the observer call
            delay = t0 + p.at - time.time()
            if delay > 0:
                time.sleep(delay)
            max_lag = max(max_lag, -delay)
            start = time.perf_counter_ns()
            r = call(p.plan_id, p.symbol, p.decision)
            costs_us.append((time.perf_counter_ns() - start) / 1000)
            results[r] = results.get(r, 0) + 1
        admitted = results.get("enqueued", 0)
        # Drain: until every admitted plan has an entry, or the cap.
        cap = time.monotonic() + settings.late_obs_max_wait_ms / 1000 + args.drain
        n_warm = 0 if side == "baseline" else 1
        while data.xlen(settings.obs_stream) - n_warm < admitted and time.monotonic() < cap:
            time.sleep(0.05)
        cpu_s, redis_s = cpu() - cpu0, redis_cpu(data) - redis0
        entries = data.xrange(settings.obs_stream)
    finally:
        if bridge:
            bridge.terminate()
        if worker:
            stop_worker(worker)
        if baseline:
            baseline.pool.shutdown(wait=True, cancel_futures=True)
    return summarise(side, rate, args, settings, plans, results, entries, costs_us, cpu_s, redis_s, max_lag)


def summarise(side, rate, args, settings, plans, results, entries, costs_us, cpu_s, redis_s, max_lag) -> dict:
    by_plan = {p.plan_id: p for p in plans}
    seen: dict[str, int] = {}
    detect, timeout_wait, polls, swept, reasons = [], [], 0, 0, {}
    for _id, raw in entries:
        e = {k.decode(): v.decode() for k, v in raw.items()}
        if e["plan_id"] not in by_plan or e["obs_point"] != "publish_plan_post":
            continue
        seen[e["plan_id"]] = seen.get(e["plan_id"], 0) + 1
        reasons[e["heat_reason"]] = reasons.get(e["heat_reason"], 0) + 1
        polls += int(e.get("polls") or 0)
        swept += '"swept":true' in e["debug_json"]
        if e["heat_found"] == "1":
            detect.append((float(e["ts_epoch"]) - float(e["heat_ts_epoch"])) * 1000)
        elif e["heat_reason"] == "timeout":
            timeout_wait.append(float(e.get("wait_ms") or 0))
    admitted = results.get("enqueued", 0)
    with_heat = sum(1 for p in plans if p.heat_ms is not None)
    catchable = sum(1 for p in plans if p.heat_ms is not None and p.heat_ms <= settings.late_obs_max_wait_ms)
    per = lambda n: round(cpu_s * 1000 / n, 3) if n else None  # noqa: E731
    return {
        "side": side, "rate": rate, "seconds": args.seconds, "published": len(plans), "admitted": admitted,
        "dropped": results.get("dropped", 0), "other_returns": {k: v for k, v in results.items()
                                                               if k not in ("enqueued", "dropped")},
        "observed": len(seen), "missing": admitted - len(seen), "duplicates": sum(n - 1 for n in seen.values()),
        "swept": swept, "reasons": reasons, "hits": len(detect), "with_heat": with_heat,
        "catchable": catchable, "coverage": round(len(detect) / with_heat, 4) if with_heat else None,
        "detect_ms": dist(detect), "timeout_wait_ms": dist(timeout_wait, 0),
        "polls": polls, "polls_per_plan": round(polls / len(seen), 2) if seen else None,
        "worker_cpu_ms": round(cpu_s * 1000), "worker_cpu_ms_per_plan": per(admitted),
        "worker_cpu_ms_per_poll": per(polls), "redis_cpu_ms": round(redis_s * 1000),
        "observe_late_us": dist(costs_us), "publisher_max_lag_ms": round(max_lag * 1000, 1),
    }


# -- report -----------------------------------------------------------------------------------
COLUMNS = (("side", 14, lambda r: r["side"]), ("rate", 5, lambda r: f"{r['rate']:g}"),
           ("pub", 5, lambda r: r["published"]), ("adm", 5, lambda r: r["admitted"]),
           ("drop", 5, lambda r: r["dropped"]), ("miss", 5, lambda r: r["missing"]),
           ("dup", 4, lambda r: r["duplicates"]), ("cov%", 6, lambda r: _f(r["coverage"], 100)),
           ("det50", 6, lambda r: _f(r["detect_ms"]["p50"])), ("det99", 6, lambda r: _f(r["detect_ms"]["p99"])),
           ("detmax", 7, lambda r: _f(r["detect_ms"]["max"])), ("to50", 6, lambda r: _f(r["timeout_wait_ms"]["p50"])),
           ("to99", 6, lambda r: _f(r["timeout_wait_ms"]["p99"])), ("polls/p", 7, lambda r: _f(r["polls_per_plan"], 1, 1)),
           ("cpu/plan", 8, lambda r: _f(r["worker_cpu_ms_per_plan"], 1, 2)),
           ("cpu/poll", 8, lambda r: _f(r["worker_cpu_ms_per_poll"], 1, 3)), ("redis", 6, lambda r: r["redis_cpu_ms"]),
           ("obs50us", 7, lambda r: _f(r["observe_late_us"]["p50"])),
           ("obs99us", 7, lambda r: _f(r["observe_late_us"]["p99"])))


def _f(v, scale: float = 1, digits: int = 0) -> str:
    return "-" if v is None else f"{v * scale:.{digits}f}"


def table(rows: list[dict]) -> str:
    lines = [" ".join(f"{name:>{w}}" for name, w, _ in COLUMNS)]
    lines += [" ".join(f"{str(get(r)):>{w}}" for _, w, get in COLUMNS) for r in rows]
    legend = ("det = detection latency ms (obs ts - heat ts, hits); to = wait ms of timeouts; cpu = worker CPU ms;"
              " redis = Redis CPU ms; obs = apply-layer cost of observe_late (us)")
    return "\n".join(lines + [legend])


def machine(data) -> dict:
    import celery
    import kombu
    import redis

    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    return {"nproc": len(os.sched_getaffinity(0)), "cpu_model": model, "loadavg": os.getloadavg(),
            "python": platform.python_version(), "celery": celery.__version__, "kombu": kombu.__version__,
            "redis_py": redis.__version__, "redis_server": data.info("server")["redis_version"],
            "git": git.strip(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="10,50,100,150", help="plans/s, comma separated")
    ap.add_argument("--seconds", type=float, default=20.0, help="load duration per rate")
    ap.add_argument("--quick", action="store_true", help="rates 10,50,100,150 for 4 s each (about 80 s)")
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/latest.json"))
    ap.add_argument("--seed", type=int, default=28)
    ap.add_argument("--sides", default="baseline,observer_tasks")
    ap.add_argument("--heat-median-ms", type=float, default=400.0)
    ap.add_argument("--heat-sigma", type=float, default=0.6, help="lognormal sigma of the heat delay")
    ap.add_argument("--heat-never", type=float, default=0.3, help="fraction of plans that never get heat")
    ap.add_argument("--drain", type=float, default=3.0, help="s to wait after the last deadline for stragglers")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/9", help="data db (FLUSHDB before each run)")
    ap.add_argument("--broker-url", default="redis://127.0.0.1:6379/10", help="broker db (FLUSHDB before each run)")
    ap.add_argument("--worker-args", default="", help="extra celery worker options (experiments only)")
    args = ap.parse_args(argv)
    if args.quick:
        args.rates, args.seconds, args.drain = "10,50,100,150", 4.0, 1.0
    bad = set(args.sides.split(",")) - {"baseline", "observer_tasks"}
    if bad:
        ap.error(f"unknown side(s): {', '.join(sorted(bad))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Before importing observer_tasks: celeryconfig reads the environment at import time.
    os.environ.update(REDIS_URL=args.redis_url, CELERY_BROKER_URL=args.broker_url, P28_METRICS_PORT="0")
    import redis

    from observer_tasks.settings import Settings

    settings = Settings.from_env()
    data, broker = redis.Redis.from_url(args.redis_url), redis.Redis.from_url(args.broker_url)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": machine(data), "args": vars(args), "settings": settings.as_env()}
    print(f"# {meta['machine']}\n# wait={settings.late_obs_max_wait_ms}ms poll={settings.late_obs_poll_ms}ms "
          f"workers={settings.late_obs_max_workers} max_inflight={settings.late_obs_max_inflight}", flush=True)
    rows = []
    for rate in (float(r) for r in args.rates.split(",")):
        for side in args.sides.split(","):
            t = time.monotonic()
            rows.append(run(args, side, rate, data, broker))
            print(f"# {side} @ {rate:g}/s done in {time.monotonic() - t:.1f}s", flush=True)
    data.flushdb()
    broker.flushdb()
    print(table(rows))
    Path(args.json).write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
