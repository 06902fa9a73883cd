"""Blocking baseline, thread-pool pattern, polling only and the wake path, on the same seeded simulated load.

    .venv/bin/python benchmarks/bench.py [--quick] [--rates 10,50,100,150,200] [--seconds 20]
        [--sides baseline,threadpool,polling,wake,wake:250] [--brokers redis,amqp] [--max-inflight N] [--kill-wake N]

By default it starts two private redis-servers on free loopback ports (data, and the Redis broker) and stops
them at the end, so their INFO commandstats count this benchmark alone; --redis-url / --broker-url use given
servers instead. Before each row it FLUSHDBs the data database and, with the Redis broker, the broker
database, and with RabbitMQ purges the queue late_obs on --amqp-url's vhost: nothing else.
Each row publishes ``rate * seconds`` plans at a fixed rate while a simulated HeatBridge (its own process)
writes each plan's heat hash after a seeded delay (lognormal, or never), waits for the observations to
drain, then reads the stream.

Sides: ``baseline`` the blocking design in this process (ThreadPoolExecutor(MAX_WORKERS), each job EXISTS +
sleep(POLL_MS) until found or MAX_WAIT_MS, an in-process inflight cap of MAX_INFLIGHT; it writes the same
stream entries with a plain XADD). ``threadpool`` the replaced design's Redis traffic without its thread
limit (every plan: an EXISTS every POLL_MS until found or MAX_WAIT_MS, then HGETALL, XADD, SETEX of the
dedupe key), the reference for the Redis load. ``polling`` the real observe_late() here and a real
``celery -A observer_tasks worker -Q late_obs`` with P28_LATE_OBS_WAKE=false. ``wake`` the same with the
wake path on; ``wake:N`` with P28_LATE_OBS_SAFETY_POLL_MS=N. Several brokers run one after the other, each in
a child process (Celery reads its broker once); the baseline does not use a broker and runs with the first.

Detection = entry ts_epoch - heat hash ts_epoch, both Redis TIME (the entry's is truncated to the ms).
In window = the heat was written within MAX_WAIT_MS of the call (5 ms margin); lost = admitted plans in
window not recorded with heat found. Looks = task runs (the worker's `inspect stats` totals), polls = the
entries' polls field. Worker CPU = user+sys of the worker's process tree (baseline: its pool threads) from
the first publish to the end of the drain. Redis CPU = INFO cpu delta, broker CPU = RabbitMQ's beam.smp
(RabbitMQ is shared: other clients' work is included).

Redis load per plan = INFO commandstats deltas over the same window, data server plus (Redis broker) broker
server, per admitted plan, net of the load generator (the HeatBridge's EVAL with its TIME, HSET and EXPIRE
inside, and the benchmark's own XLEN). Commands count every call, those inside scripts and MULTI included.
Command time counts each top-level command once: a script's EVALSHA time includes its inner commands (so
the commands the observer's Lua scripts call are not added again), and EXEC's includes the commands it
runs (so EXEC's own time is left out instead).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import random
import re
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

from observer_tasks.core.contract import HEAT_COPIED, WORKERS, dedupe_key
from observer_tasks.core.settings import LATE_POINT

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
COPIED = HEAT_COPIED
WORKERS_KEY = WORKERS
WINDOW_MARGIN_S = 0.005
#: Most plans per row: the stream is trimmed to about 10 000 entries (STREAM_MAXLEN) and is read at the end.
MAX_PLANS = 9_000
#: The sides that run in this process without the observer (and without a broker).
REFERENCES = ("baseline", "threadpool")


@dataclass(frozen=True)
class Plan:
    plan_id: str
    symbol: str
    decision: str
    at: float  # publish offset from the start of the load (s)
    heat_ms: float | None  # HeatBridge delay after publishing (ms), None = never


def make_plans(args: argparse.Namespace, rate: float) -> list[Plan]:
    """The same plans, publish times and heat delays for every side (seeded per rate)."""
    rng = random.Random(f"{args.seed}:{rate}")
    plans = []
    for i in range(min(int(rate * args.seconds), MAX_PLANS)):
        never = rng.random() < args.heat_never
        delay = args.heat_median_ms * math.exp(args.heat_sigma * rng.gauss(0.0, 1.0))
        plans.append(Plan(f"bench-{rate:g}-{i:06d}", rng.choice(SYMBOLS),
                          rng.choice(("EXECUTE", "EXECUTE", "SKIP", "BLOCKED")), i / rate, None if never else delay))
    return plans


def heat_bridge(redis_url: str, prefix: str, writes: list[tuple[float, str, str]], conn) -> None:
    """Child process: write each heat hash at t0 + offset (t0 arrives over the pipe)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    rng = random.Random(len(writes))
    conn.send("ready")
    t0 = conn.recv()
    for offset, plan_id, symbol in writes:
        delay = t0 + offset - time.time()
        if delay > 0:
            time.sleep(delay)
        level, action = rng.choice(HEATS)
        # EVAL, not EVALSHA: the observer never sends EVAL, so the generator's calls can be taken out of the
        # Redis load exactly (with the TIME, HSET and EXPIRE inside each).
        client.eval(HEAT_LUA, 1, prefix + plan_id, plan_id, symbol, level, f"{rng.random():.3f}", action)


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


def rabbit_cpu() -> float | None:
    """CPU seconds of the local RabbitMQ (beam.smp), None when there is none to read."""
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{entry}/comm").read_text().strip() == "beam.smp":
                return proc_cpu(f"/proc/{entry}/stat")[0]
        except OSError:
            continue
    return None


def dist(values: list[float], digits: int = 1) -> dict[str, float | None]:
    """Nearest-rank p50/p99/max (None without values)."""
    ordered = sorted(values)
    pick = lambda q: round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], digits) if ordered else None  # noqa: E731
    return {"p50": pick(0.50), "p99": pick(0.99), "max": pick(1.0)}


# -- Redis load (INFO commandstats) -------------------------------------------------------------
#: Commands the generator runs inside each of its EVALs (taken out of the load with the EVAL itself).
GENERATOR_INNER = ("time", "hset", "expire")
SCRIPT_CALL = re.compile(r"redis\.p?call\(\s*'(\w+)'", re.IGNORECASE)


def script_commands() -> set[str]:
    """Every command the observer's Lua scripts call (their time is inside EVALSHA's)."""
    names: set[str] = set()
    for lua in (ROOT / "observer_tasks").rglob("*.lua"):
        names.update(m.lower() for m in SCRIPT_CALL.findall(lua.read_text()))
    return names


def commandstats(client) -> dict[str, tuple[int, int]]:
    """{command: (calls, usec)} from INFO commandstats (subcommands as 'client|setname')."""
    return {name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
            for name, v in client.info("commandstats").items()}


def redis_load(before: dict, after: dict, inner: set[str], exec_nests: bool) -> dict:
    """One server's load over a window, net of the generator and the benchmark's own reads.

    inner: commands whose time is already in their script's EVALSHA; exec_nests: leave EXEC's own time out
    (it includes the commands it runs, which are counted themselves)."""
    by: dict[str, list[int]] = {}
    generated = after.get("eval", (0, 0))[0] - before.get("eval", (0, 0))[0]
    for name, (calls1, usec1) in after.items():
        calls0, usec0 = before.get(name, (0, 0))
        calls, usec = calls1 - calls0, usec1 - usec0
        own = calls if name in ("eval", "xlen") else generated if name in GENERATOR_INNER else 0
        net = max(0, calls - own)
        if net:
            by[name] = [net, round(usec * net / calls)]
    timed = {n: v for n, v in by.items() if n not in inner and not (exec_nests and n == "exec")}
    return {"commands": sum(v[0] for v in by.values()), "usec": sum(v[1] for v in timed.values()),
            "generator_writes": generated, "by_command": dict(sorted(by.items(), key=lambda kv: -kv[1][0]))}


class PrivateRedis:
    """A redis-server of the benchmark's own on a loopback port: its commandstats count nothing else."""

    def __init__(self, port: int, workdir: Path, name: str) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir), "--logfile", str(workdir / f"redis-{name}.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        import redis

        client, deadline = redis.Redis(port=self.port), time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    sys.exit(f"redis-server on port {self.port} did not start; see {workdir}")
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the baseline -----------------------------------------------------------------------------
class Baseline:
    """The blocking design: a thread pool polling EXISTS, an in-process inflight counter."""

    def __init__(self, settings, client) -> None:
        self.s, self.client, self.lock = settings, client, threading.Lock()
        self.inflight, self.tids = 0, list[int]()
        self.pool = ThreadPoolExecutor(settings.late_obs_max_workers,
                                       initializer=lambda: self.tids.append(threading.get_native_id()))

    def observe_late(self, plan_id: str, symbol: str, decision: str) -> str:
        with self.lock:
            if self.inflight >= self.s.late_obs_max_inflight:
                return "dropped"
            self.inflight += 1
        self.pool.submit(self.job, plan_id, symbol, decision, time.time())
        return "enqueued"

    def job(self, plan_id: str, symbol: str, decision: str, published_s: float) -> None:
        try:
            client, key = self.client, self.s.heat_lookup_prefix + plan_id
            start, polls = time.monotonic(), 1
            while not (found := client.exists(key)) and (time.monotonic() - start) * 1000 < self.s.late_obs_max_wait_ms:
                time.sleep(self.s.late_obs_poll_ms / 1000)
                polls += 1
            (secs, usecs), raw = client.pipeline(transaction=False).time().hgetall(key).execute()
            heat = {k.decode(): v.decode() for k, v in raw.items()} if found else {}
            now = secs + usecs / 1e6  # Redis TIME at the read, like the observer's entries
            wait_ms = max(0, int((now - published_s) * 1000))
            entry = {"ts_epoch": f"{now:.3f}", "plan_id": plan_id, "symbol": symbol, "apply_component": "apply",
                     "obs_point": "publish_plan_post", "heat_found": "1" if found else "0",
                     **{field: heat.get(source, "") for field, source in COPIED},
                     "heat_reason": "ok" if found else "timeout", "apply_decision": decision,
                     "debug_json": json.dumps({"polls": polls, "wait_ms": wait_ms}),
                     "wait_ms": str(wait_ms), "polls": str(polls), "recorded_by": "look"}
            client.xadd(self.s.obs_stream, entry, maxlen=10_000, approximate=True)
        finally:
            with self.lock:
                self.inflight -= 1

    def cpu(self) -> float:
        return sum(proc_cpu(f"/proc/{os.getpid()}/task/{tid}/stat")[0] for tid in list(self.tids))


class ThreadPoolPattern:
    """The replaced design's Redis traffic, without its thread limit (the reference for the Redis load).

    Each plan, as the replaced module (quantum_trader's microservices/apply_layer/heat_observer.py) makes it: an
    EXISTS of the heat key every POLL_MS until found or MAX_WAIT_MS, then its observe(): EXISTS of the dedupe
    key, SETEX of it, HGETALL, XADD (its counters are in-process Prometheus counters, not Redis). Four threads
    take the due polls from one heap, so no plan waits for a free thread (the real design's
    four blocking threads drop most plans from a few per second: see ``baseline``)."""

    THREADS = 4

    def __init__(self, settings, client) -> None:
        import heapq

        self.s, self.client, self.heapq = settings, client, heapq
        self.heap: list[tuple[float, int, str, str, str, float]] = []
        self.cond, self.seq, self.stopped, self.tids = threading.Condition(), 0, False, list[int]()
        self.threads = [threading.Thread(target=self.work, daemon=True) for _ in range(self.THREADS)]
        for t in self.threads:
            t.start()

    def observe_late(self, plan_id: str, symbol: str, decision: str) -> str:
        now = time.monotonic()
        with self.cond:
            self.seq += 1
            self.heapq.heappush(self.heap, (now, self.seq, plan_id, symbol, decision, now))
            self.cond.notify()
        return "enqueued"

    def work(self) -> None:
        self.tids.append(threading.get_native_id())
        s, key_of = self.s, self.s.heat_lookup_prefix.__add__
        while True:
            with self.cond:
                while not self.stopped and (not self.heap or self.heap[0][0] > time.monotonic()):
                    self.cond.wait(max(0.0, self.heap[0][0] - time.monotonic()) if self.heap else None)
                if self.stopped:
                    return
                _, seq, plan_id, symbol, decision, start = self.heapq.heappop(self.heap)
            waited_ms = (time.monotonic() - start) * 1000
            if not self.client.exists(key_of(plan_id)) and waited_ms < s.late_obs_max_wait_ms:
                with self.cond:
                    self.heapq.heappush(self.heap, (time.monotonic() + s.late_obs_poll_ms / 1000, seq, plan_id,
                                                    symbol, decision, start))
                continue
            # Then the replaced module's observe(): EXISTS of the dedupe key, SETEX of it, HGETALL, XADD.
            dedupe = dedupe_key(LATE_POINT, plan_id)
            if self.client.exists(dedupe):
                continue
            self.client.setex(dedupe, s.dedupe_ttl_sec, "1")
            heat = {k.decode(): v.decode() for k, v in self.client.hgetall(key_of(plan_id)).items()}
            found, now = bool(heat), time.time()
            entry = {"ts_epoch": f"{now:.3f}", "plan_id": plan_id, "symbol": symbol, "apply_component": "apply",
                     "obs_point": "publish_plan_post", "heat_found": "1" if found else "0",
                     **{field: heat.get(source, "") for field, source in COPIED},
                     "heat_reason": "ok" if found else "timeout", "apply_decision": decision,
                     "debug_json": json.dumps({"wait_ms": int(waited_ms)}), "wait_ms": str(int(waited_ms)),
                     "recorded_by": "look"}
            self.client.xadd(s.obs_stream, entry, maxlen=10_000, approximate=True)

    def cpu(self) -> float:
        return sum(proc_cpu(f"/proc/{os.getpid()}/task/{tid}/stat")[0] for tid in list(self.tids))

    def close(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        for t in self.threads:
            t.join(5)


# -- the worker -------------------------------------------------------------------------------
def side_env(side: str) -> dict[str, str]:
    """The worker's environment for a side: polling, wake or wake:<safety poll ms>."""
    env = {k: v for k, v in os.environ.items() if k != "P28_LATE_OBS_SAFETY_POLL_MS"}
    env["P28_LATE_OBS_WAKE"] = "false" if side == "polling" else "true"
    if side.startswith("wake:"):
        env["P28_LATE_OBS_SAFETY_POLL_MS"] = side.split(":", 1)[1]
    return env


def start_worker(args: argparse.Namespace, side: str, data, log_path: Path) -> subprocess.Popen:
    """Start the worker and wait until it answers a ping and its heartbeat shows the wake state wanted."""
    from observer_tasks import app

    cmd = [CELERY, "-A", "observer_tasks", "worker", "-Q", "late_obs", *shlex.split(args.worker_args)]
    with open(log_path, "a") as log:
        log.write(f"\n==== {time.strftime('%H:%M:%S')} {side}: {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=side_env(side), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    wanted = "off" if side == "polling" else "connected"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        beats = [json.loads(v) for v in data.hvals(WORKERS_KEY)]
        if any(b.get("wake") == wanted for b in beats) and app.control.ping(timeout=0.5):
            return proc
        time.sleep(0.2)
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


def task_runs() -> int | None:
    """Tasks the worker received (late_observe + late_poll), from `inspect stats`."""
    from observer_tasks import app

    stats = app.control.inspect(timeout=2.0).stats() or {}
    return sum(sum(s.get("total", {}).values()) for s in stats.values()) if stats else None


def kill_wake(data, times: list[float], done: list[dict]) -> None:
    """At each time (epoch s), CLIENT KILL every observer_tasks:wake connection on our data database."""
    db = int(data.connection_pool.connection_kwargs.get("db", 0))
    for at in times:
        time.sleep(max(0.0, at - time.time()))
        ids = [c["id"] for c in data.client_list() if c.get("name") == "observer_tasks:wake" and int(c["db"]) == db]
        for cid in ids:
            data.client_kill_filter(_id=cid)
        done.append({"at": round(at, 3), "killed": len(ids)})


# -- one row ----------------------------------------------------------------------------------
def run(args: argparse.Namespace, side: str, rate: float, data, broker) -> dict:
    from observer_tasks import app, observe_late
    from observer_tasks.client import producer
    from observer_tasks.core.settings import Settings

    # The apply layer's side reads the safety interval too (the first look's countdown): same as the worker.
    for name in ("P28_LATE_OBS_WAKE", "P28_LATE_OBS_SAFETY_POLL_MS"):
        os.environ.pop(name, None)
        if name in side_env(side):
            os.environ[name] = side_env(side)[name]
    producer.reset()

    settings, plans = Settings.from_env(), make_plans(args, rate)
    stream, prefix = settings.obs_stream, settings.heat_lookup_prefix
    data.flushdb()
    if broker is not None:
        broker.flushdb()
    else:
        app.control.purge()
    worker = baseline = pattern = bridge = None
    kills: list[dict] = []
    try:
        if side == "baseline":
            baseline = Baseline(settings, data)
            call: Any = baseline.observe_late
            cpu, warm = baseline.cpu, 0
        elif side == "threadpool":
            pattern = ThreadPoolPattern(settings, data)
            call, cpu, warm = pattern.observe_late, pattern.cpu, 0
        else:
            worker = start_worker(args, side, data, Path(args.json).parent / "worker.log")
            # Warm the producer up and check the round trip with a plan whose heat is already there.
            data.hset(prefix + "bench-warmup", mapping={"ts_epoch": f"{time.time():.6f}", "heat_level": "cold"})
            observe_late("bench-warmup", "BTCUSDT", "EXECUTE")
            t = time.monotonic()
            while data.xlen(stream) < 1 and time.monotonic() - t < 10:
                time.sleep(0.05)
            call, cpu, warm = observe_late, (lambda: tree_cpu(worker.pid)), data.xlen(stream)
        runs0 = task_runs() if worker else None

        writes = sorted((p.at + p.heat_ms / 1000, p.plan_id, p.symbol) for p in plans if p.heat_ms is not None)
        ctx = multiprocessing.get_context("spawn")
        parent_end, child_end = ctx.Pipe()
        bridge = ctx.Process(target=heat_bridge, args=(settings.redis_url, prefix, writes, child_end), daemon=True)
        bridge.start()
        if not parent_end.poll(30):
            raise RuntimeError("the HeatBridge process did not start")
        parent_end.recv()

        returns: dict[str, int] = {}
        called_at: dict[str, float] = {}
        admitted: set[str] = set()
        costs_us, max_lag, call_cpu_ns = [], 0.0, 0
        cpu0, redis0, rabbit0 = cpu(), redis_cpu(data), rabbit_cpu()
        stats0 = commandstats(data), commandstats(broker) if broker is not None else {}
        t0 = time.time() + 0.1
        parent_end.send(t0)
        if worker and side != "polling" and args.kill_wake:
            times = [t0 + args.seconds * (i + 1) / (args.kill_wake + 1) for i in range(args.kill_wake)]
            threading.Thread(target=kill_wake, args=(data, times, kills), daemon=True).start()
        for p in plans:  # the apply layer: publish at a fixed rate, timing the observer call
            delay = t0 + p.at - time.time()
            if delay > 0:
                time.sleep(delay)
            max_lag = max(max_lag, -delay)
            called_at[p.plan_id] = time.time()
            start, start_cpu = time.perf_counter_ns(), time.thread_time_ns()
            r = call(p.plan_id, p.symbol, p.decision)
            costs_us.append((time.perf_counter_ns() - start) / 1000)
            call_cpu_ns += time.thread_time_ns() - start_cpu
            returns[r] = returns.get(r, 0) + 1
            if r in ("enqueued", "deferred"):  # handed over: the outbox makes a deferred call once Redis answers
                admitted.add(p.plan_id)
        # Every chain ends by its deadline: wait for that (and the entries), so the last looks are counted.
        end = time.time() + settings.late_obs_max_wait_ms / 1000 + 0.5
        cap = end + args.drain
        while (data.xlen(stream) - warm < returns.get("enqueued", 0) or time.time() < end) and time.time() < cap:
            time.sleep(0.05)
        stats1 = commandstats(data), commandstats(broker) if broker is not None else {}
        runs = task_runs() if worker else None
        while runs is not None and time.time() < cap + 10:  # a saturated worker is still working its backlog
            time.sleep(1.0)
            runs, before = task_runs(), runs
            if runs == before:
                break
        cpu_s, redis_s, rabbit1 = cpu() - cpu0, redis_cpu(data) - redis0, rabbit_cpu()
        runs = (runs or 0) - (runs0 or 0) if worker else None
        entries = [{k.decode(): v.decode() for k, v in raw.items()} for _, raw in data.xrange(stream)]
        pipe = data.pipeline(transaction=False)
        for p in plans:
            pipe.hget(prefix + p.plan_id, "ts_epoch")
        heat_at = {p.plan_id: float(ts) for p, ts in zip(plans, pipe.execute(), strict=True) if ts}
        beats = [json.loads(v) for v in data.hvals(WORKERS_KEY)]
    finally:
        if bridge:
            bridge.terminate()
        if worker:
            stop_worker(worker)
        if baseline:
            baseline.pool.shutdown(wait=True, cancel_futures=True)
        if pattern:
            pattern.close()
    inner = script_commands() if worker else set()
    load = {"data": redis_load(stats0[0], stats1[0], inner, exec_nests=True),
            "broker": redis_load(stats0[1], stats1[1], set(), exec_nests=True) if broker is not None else None}
    extra = {"observe_late_us": dist(costs_us), "observe_late_cpu_us": round(call_cpu_ns / 1000 / len(plans), 1),
             "kills": kills, "resyncs": sum(b.get("resyncs", 0) for b in beats), "task_runs": runs,
             "broker_cpu_ms": round((rabbit1 - rabbit0) * 1000) if broker is None and rabbit0 and rabbit1 else None,
             "publisher_max_lag_ms": round(max_lag * 1000, 1), "redis_cpu_ms": round(redis_s * 1000),
             "redis_load": load}
    return summarise(side, rate, args, settings, (plans, returns, admitted, called_at, heat_at), entries, cpu_s, extra)


def summarise(side, rate, args, settings, load, entries, cpu_s, extra) -> dict:
    plans, returns, admitted, called_at, heat_at = load
    seen: dict[str, dict] = {}
    dup, polls = 0, 0
    reasons: dict[str, int] = {}
    by: dict[str, int] = {}
    detect: list[float] = []
    late: list[float] = []  # how long after the deadline the deciding look of a timeout ran (ms)
    for e in entries:
        if e["plan_id"] not in called_at or e["obs_point"] != "publish_plan_post":
            continue
        dup += e["plan_id"] in seen
        seen[e["plan_id"]] = e
        reasons[e["heat_reason"]] = reasons.get(e["heat_reason"], 0) + 1
        by[e.get("recorded_by", "?")] = by.get(e.get("recorded_by", "?"), 0) + 1
        polls += int(e.get("polls") or 0)
        if e["heat_found"] == "1":
            detect.append((float(e["ts_epoch"]) - float(e["heat_ts_epoch"])) * 1000)
        elif e["heat_reason"] == "timeout" and e.get("recorded_by") == "look" and side not in REFERENCES:
            late.append(float(json.loads(e["debug_json"]).get("late_ms", 0)))
    window = settings.late_obs_max_wait_ms / 1000 - WINDOW_MARGIN_S
    in_window = [pid for pid in admitted if pid in heat_at and heat_at[pid] - called_at[pid] <= window]
    lost = [pid for pid in in_window if seen.get(pid, {}).get("heat_found") != "1"]
    n = len(admitted)
    per = lambda x: round(x / n, 3) if n and x is not None else None  # noqa: E731
    servers = [v for v in extra["redis_load"].values() if v is not None]
    for v in servers:
        v["commands_per_plan"], v["usec_per_plan"] = per(v["commands"]), per(v["usec"])
        v["by_command_per_plan"] = {c: [per(k), per(u)] for c, (k, u) in v.pop("by_command").items()}
    extra["redis_load"]["commands_per_plan"] = per(sum(v["commands"] for v in servers))
    extra["redis_load"]["usec_per_plan"] = per(sum(v["usec"] for v in servers))
    return {
        "side": side, "rate": rate, "broker": args.brokers, "kill_wake": args.kill_wake if extra["kills"] else 0,
        "seconds": args.seconds, "max_inflight": settings.late_obs_max_inflight, "published": len(plans),
        "admitted": n, "dropped": returns.get("dropped", 0), "returns": returns, "observed": len(seen),
        # refused: observe_late said 'error' (e.g. its 50 ms call timeout tripped the breaker); such a plan may
        # still have had its lease taken, and then has an entry (by the sweeper): counted in observed only.
        "refused": len(plans) - n - returns.get("dropped", 0),
        "missing": sum(pid not in seen for pid in admitted), "duplicates": dup, "reasons": reasons, "recorded_by": by,
        "in_window": len(in_window), "lost": len(lost), "lost_sample": lost[:10], "hits": len(detect),
        "coverage": round(len(detect) / len(in_window), 4) if in_window else None, "detect_ms": dist(detect),
        "timeout_late_ms": dist(late, 0),
        "looks_per_plan": per(extra["task_runs"]), "polls_per_plan": per(polls),
        "worker_cpu_ms": round(cpu_s * 1000), "worker_cpu_ms_per_plan": per(cpu_s * 1000), **extra,
    }


# -- report -----------------------------------------------------------------------------------
COLUMNS = (  # header, result key ("a.b" = nested), scale (None: as is), decimals
    ("broker", "broker", None, 0), ("side", "label", None, 0), ("rate", "rate", 1, 0),
    ("adm", "admitted", None, 0), ("drop", "dropped", None, 0), ("err", "refused", None, 0),
    ("miss", "missing", None, 0), ("dup", "duplicates", None, 0), ("lost", "lost", None, 0),
    ("det50", "detect_ms.p50", 1, 1), ("det99", "detect_ms.p99", 1, 1), ("detmax", "detect_ms.max", 1, 0),
    ("late99", "timeout_late_ms.p99", 1, 0), ("looks/p", "looks_per_plan", 1, 2), ("polls/p", "polls_per_plan", 1, 2),
    ("look/wake/sweep/admit", "by", None, 0),
    ("cpu/plan", "worker_cpu_ms_per_plan", 1, 2), ("redis", "redis_cpu_ms", None, 0),
    ("rabbit", "broker_cpu_ms", None, 0), ("obs99us", "observe_late_us.p99", 1, 0),
    ("cmd/p", "redis_load.commands_per_plan", 1, 1), ("bcmd/p", "redis_load.broker.commands_per_plan", 1, 1),
    ("us/p", "redis_load.usec_per_plan", 1, 0), ("bus/p", "redis_load.broker.usec_per_plan", 1, 0),
)
LEGEND = ("err = observe_late said 'error'; lost = heat within MAX_WAIT, not recorded with heat; det = detection ms;\n"
          "late99 = p99 of how late after the deadline a timeout's last look ran (ms: the worker's backlog);\n"
          "looks/p = task runs per admitted plan, polls/p = entries' polls field; look/wake/sweep: recorded_by;\n"
          "cpu/plan = worker CPU ms per admitted plan; redis, rabbit = server CPU ms (shared servers); "
          "obs99us = observe_late p99 in the caller;\n"
          "cmd/p, us/p = Redis commands (inside scripts counted) and command time (us) per admitted plan, data plus\n"
          "broker server, net of the generator; bcmd/p, bus/p = the Redis broker's share")


def label(r: dict) -> str:
    return r["side"] + (f" kill x{r['kill_wake']}" if r.get("kill_wake") else "") + (
        f" (inflight {r['max_inflight']})" if r["max_inflight"] != 200 else "")


def cell(row: dict, key: str, scale: float | None, digits: int) -> str:
    if key == "label":
        return label(row)
    if key == "by":
        return "/".join(str(row["recorded_by"].get(k, 0)) for k in ("look", "wake", "sweep", "admit"))
    value: Any = row
    for part in key.split("."):
        value = None if value is None else value.get(part)
    if scale is None or value is None:
        return "-" if value is None else str(value)
    return f"{value * scale:.{digits}f}"


def table(rows: list[dict], markdown: bool = False) -> str:
    cells = [[h for h, *_ in COLUMNS]] + [[cell(r, *spec) for _, *spec in COLUMNS] for r in rows]
    if markdown:
        return "\n".join("| " + " | ".join(line) + " |" for line in cells[:1] + [["---"] * len(COLUMNS)] + cells[1:])
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join([" ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in cells] + [LEGEND])


#: Redis load per plan the issue asks for, as multiples of the thread-pool pattern's in the same run: commands (by
#: broker: the Redis broker also carries the messages) and command time.
LOAD_GOALS = {"redis": (1.8, 3.0), "amqp": (1.0, 3.0)}


def goals(rows: list[dict]) -> list[str]:
    """The issue's goals, checked on the rows present: one line each."""
    out = []

    def clean(r: dict) -> bool:
        return r["dropped"] + r.get("refused", 0) + r["missing"] + r["duplicates"] == 0

    for r in rows:
        det, name = r["detect_ms"], f"{r['broker']} {label(r)} @ {r['rate']:g}/s"
        if r["side"] == "wake" and r["rate"] == 50 and not r.get("kill_wake"):
            ok = clean(r) and (det["p50"] or 0) <= 5 and (det["p99"] or 0) <= 20
            out.append(f"{'met' if ok else 'MISSED'}: {name}: no losses, p50 {det['p50']} <= 5, p99 {det['p99']} <= 20")
            poll = next((p for p in rows if p["side"] == "polling" and p["rate"] == 50 and p["broker"] == r["broker"]
                         and p["max_inflight"] == r["max_inflight"]), None)
            if poll and poll["worker_cpu_ms_per_plan"] and r["worker_cpu_ms_per_plan"] is not None:
                ratio = r["worker_cpu_ms_per_plan"] / poll["worker_cpu_ms_per_plan"]
                verdict = "met" if ratio <= 0.4 else "MISSED"
                out.append(f"{verdict}: {name}: worker CPU/plan {ratio:.2f} x polling <= 0.4")
        if r["side"] == "wake" and r["rate"] == 150 and r["max_inflight"] == 200 and not r.get("kill_wake"):
            ok = clean(r) and (det["p99"] or 0) <= 25
            out.append(f"{'met' if ok else 'MISSED'}: {name}: no losses, p99 {det['p99']} <= 25")
        broker_load = r["redis_load"].get("broker") or {}
        if r["side"] == "wake" and "publish" in broker_load.get("by_command_per_plan", {}):
            events, usec = broker_load["by_command_per_plan"]["publish"]
            cpu = r.get("event_cpu_us")
            out.append(f"task events: {name}: {events} PUBLISH per plan ({usec} us of Redis time; worker heartbeats "
                       f"included), {cpu} us of sender CPU each = {round(events * (cpu or 0) / 1000, 3)} ms per plan")
        load = LOAD_GOALS.get(r["broker"])
        pool = next((p for p in rows if p["side"] == "threadpool" and p["rate"] == r["rate"]), None)
        if r["side"] == "wake" and load and pool and not r.get("kill_wake"):
            cmds, usec = r["redis_load"]["commands_per_plan"], r["redis_load"]["usec_per_plan"]
            base_cmds, base_usec = pool["redis_load"]["commands_per_plan"], pool["redis_load"]["usec_per_plan"]
            if cmds is not None and base_cmds and base_usec:
                ratio_c, ratio_u = cmds / base_cmds, usec / base_usec
                ok = ratio_c <= load[0] and ratio_u <= load[1]
                out.append(f"{'met' if ok else 'MISSED'}: {name}: Redis load per plan {cmds} commands = "
                           f"{ratio_c:.2f} x the thread pool's {base_cmds} (goal <= {load[0]}), {usec} us = "
                           f"{ratio_u:.2f} x {base_usec} (goal <= {load[1]})")
        if r.get("kill_wake"):
            ok = r["missing"] + r["duplicates"] + r["lost"] == 0
            out.append(f"{'met' if ok else 'MISSED'}: {name}: kills {r['kills']}, missing {r['missing']}, "
                       f"duplicates {r['duplicates']}, lost {r['lost']}, resyncs {r['resyncs']}")
    observer_rows = [r for r in rows if r["side"] not in REFERENCES and not r.get("kill_wake")]
    for key in sorted({(r["broker"], label(r)) for r in observer_rows}):
        good = [r["rate"] for r in rows if (r["broker"], label(r)) == key and clean(r)
                and (r["detect_ms"]["p99"] or 1e9) <= 25]
        out.append(f"highest rate with no losses and p99 <= 25 ms, {key[0]} {key[1]}: {max(good, default=0):g}/s")
    return out


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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[2])
    ap.add_argument("--rates", default="10,50,100,150,200", help="plans/s, comma separated")
    ap.add_argument("--seconds", type=float, default=20.0, help=f"load duration per row (at most {MAX_PLANS} plans)")
    ap.add_argument("--quick", action="store_true", help="rates 50,150 for 4 s each, --drain 1 (under 3 minutes)")
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/latest.json"))
    ap.add_argument("--seed", type=int, default=28)
    ap.add_argument("--sides", default="baseline,threadpool,polling,wake",
                    help="baseline, threadpool, polling, wake, wake:<safety poll ms>")
    ap.add_argument("--brokers", default="redis,amqp", help="redis and/or amqp (skipped if unreachable)")
    ap.add_argument("--max-inflight", type=int, help="P28_LATE_OBS_MAX_INFLIGHT for every side (default: 200)")
    ap.add_argument("--kill-wake", type=int, default=0, help="CLIENT KILL the wake connection N times per wake row")
    ap.add_argument("--heat-median-ms", type=float, default=400.0)
    ap.add_argument("--heat-sigma", type=float, default=0.6, help="lognormal sigma of the heat delay")
    ap.add_argument("--heat-never", type=float, default=0.3, help="fraction of plans that never get heat")
    ap.add_argument("--drain", type=float, default=3.0, help="s to wait past the last plan's MAX_WAIT_MS")
    ap.add_argument("--redis-url", default="",
                    help="data db, FLUSHDB before each row (default: a private redis-server this run starts)")
    ap.add_argument("--broker-url", default="",
                    help="Redis broker db, FLUSHDB before each row (default: a second private redis-server)")
    ap.add_argument("--redis-port", type=int, default=0,
                    help="port of the private data server (the broker's is the next one; default: free ports)")
    ap.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/bench",
                    help="RabbitMQ: queue late_obs purged before each row (%(default)s)")
    ap.add_argument("--worker-args", default="", help="extra celery worker options (experiments only)")
    args = ap.parse_args(argv)
    if args.quick:
        args.rates, args.seconds, args.drain = "50,150", 4.0, 1.0
    if any(s not in (*REFERENCES, "polling", "wake") and not (s.startswith("wake:") and s[5:].isdigit())
           for s in args.sides.split(",")):
        ap.error("--sides takes baseline, threadpool, polling, wake and wake:<ms>")
    if set(args.brokers.split(",")) - {"redis", "amqp"}:
        ap.error("--brokers takes redis and/or amqp")
    return args


def amqp_problem(url: str) -> str | None:
    import kombu

    try:
        with kombu.Connection(url, connect_timeout=2) as conn:
            conn.connect()
    except Exception as exc:  # any failure means: skip this broker
        return repr(exc)[:120]
    return None


def event_cpu_us(n: int = 500) -> float:
    """Sender CPU of one task event as the worker sends a plan's final state (its own Dispatcher), us."""
    from observer_tasks import app

    result = repr({"reason": "ok", "wait_ms": 400, "recorded_by": "wake"})
    with app.connection_for_write() as conn:
        dispatcher = app.events.Dispatcher(conn, hostname="bench@event-cost", buffer_while_offline=False)
        dispatcher.send("task-succeeded", uuid="bench-event-warmup", result=result, runtime=0.4)
        start = time.thread_time()
        for i in range(n):
            dispatcher.send("task-succeeded", uuid=f"bench-event-{i}", result=result, runtime=0.4)
        cpu = time.thread_time() - start
        dispatcher.close()
    return round(cpu / n * 1e6, 1)


def measure(args: argparse.Namespace) -> list[dict]:
    """Every row for one broker, in this process."""
    broker_url = args.amqp_url if args.brokers == "amqp" else args.broker_url
    # Before importing observer_tasks: celeryconfig and the producer read the environment once.
    os.environ.update(REDIS_URL=args.redis_url, CELERY_BROKER_URL=broker_url, P28_METRICS_PORT="0")
    if args.max_inflight:
        os.environ["P28_LATE_OBS_MAX_INFLIGHT"] = str(args.max_inflight)
    import redis

    data = redis.Redis.from_url(args.redis_url)
    broker = redis.Redis.from_url(broker_url) if args.brokers == "redis" else None
    rows = []
    # Before the rows (and outside their windows): what one task event costs the worker.
    event_us = event_cpu_us() if any(s not in REFERENCES for s in args.sides.split(",")) else None
    for rate in (float(r) for r in args.rates.split(",")):
        for side in args.sides.split(","):
            t = time.monotonic()
            rows.append(run(args, side, rate, data, broker))
            rows[-1]["event_cpu_us"] = event_us
            print(f"# {args.brokers} {side} @ {rate:g}/s done in {time.monotonic() - t:.1f}s", flush=True)
    data.flushdb()
    if broker is not None:
        broker.flushdb()
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    servers = []
    try:
        for name in ("redis_url", "broker_url"):
            if not getattr(args, name):  # private servers: their commandstats count this run alone
                port = args.redis_port + len(servers) if args.redis_port else 0
                servers.append(PrivateRedis(port, Path(args.json).parent / "redis", name.split("_")[0]))
                setattr(args, name, servers[-1].url)
                argv = [*argv, f"--{name.replace('_', '-')}", servers[-1].url]
        return run_all(args, argv)
    finally:
        for server in servers:
            server.stop()


def run_all(args: argparse.Namespace, argv: list[str]) -> int:
    brokers = args.brokers.split(",")
    import redis

    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": machine(redis.Redis.from_url(args.redis_url)), "args": vars(args)}
    if len(brokers) == 1 and not (brokers == ["amqp"] and amqp_problem(args.amqp_url)):
        rows = measure(args)  # one broker: here (also how the parent runs each broker)
        print(table(rows), *goals(rows), sep="\n")
        out.write_text(json.dumps({"meta": meta, "results": rows, "goals": goals(rows)}, indent=2))
        return 0
    print(f"# {meta['machine']}", flush=True)
    rows, skipped, sides = [], {}, args.sides
    for broker in brokers:
        if not sides:
            break
        if broker == "amqp" and (why := amqp_problem(args.amqp_url)):
            print(f"# skipping amqp: {why}", flush=True)
            skipped[broker] = why
            continue
        part = out.with_suffix(f".{broker}.json")
        subprocess.run([sys.executable, __file__, *argv, "--brokers", broker, "--sides", sides, "--json", str(part)],
                       check=True)
        rows += json.loads(part.read_text())["results"]
        # The references use no broker: once is enough.
        sides = ",".join(s for s in sides.split(",") if s not in REFERENCES)
    print("\n# all brokers", table(rows), *goals(rows), sep="\n")
    out.write_text(json.dumps({"meta": meta, "skipped": skipped, "results": rows, "goals": goals(rows)}, indent=2))
    print(f"# wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
