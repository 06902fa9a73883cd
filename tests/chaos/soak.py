"""The soak from start to end: the cluster, the workers (and the RabbitMQ proxy), the schedule printed, the apply
process and HeatBridge under the schedule, the drain, the final reads, the checker.

Everything started here is stopped on every way out (an ExitStack: a failure, Ctrl-C, SIGTERM through
__main__), in reverse order: HeatBridge, the apply process, the stream tail, the workers, the proxy, the
Redis servers and sentinels, and the run's temporary folder (unless a folder was given to keep).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from observer_tasks.core.settings import Settings
from observer_tasks.core.timings import CALL_TIMEOUT_S

from ..conftest import ROOT, poll, ports_in, scrape
from . import schedule as sched
from .checker import Report, check
from .cluster import SERVICE, ChaosCluster
from .collect import INFLIGHT, MetricsTimeline, StreamTail, master_client, write_final
from .evidence import load
from .faults import FaultRunner
from .table import render
from .tcpproxy import TcpProxy
from .workers import Workers

OBSERVER_VARS = re.compile(r"^(P28_.*|REDIS_URL|CELERY_BROKER_URL)$")


@dataclass
class Config:
    seed: int = 1
    minutes: float = 2.0
    broker: str = "redis"  # or "amqp"
    down_after_ms: int = 5000
    rate: float = 40.0  # plans per second
    burst_size: int = 300  # 1.5 x MAX_INFLIGHT (200)
    workers: int = 2
    ports: str = field(default_factory=lambda: os.environ.get("CHAOS_PORTS", "7100-7199"))
    amqp_url: str = field(default_factory=lambda: os.environ.get("CHAOS_AMQP_URL",
                                                                  "amqp://guest:guest@127.0.0.1:5672/h1"))
    run_dir: Path | None = None  # kept when given; a temporary folder (removed) otherwise
    observer_env: dict[str, str] = field(default_factory=dict)  # extra observer variables (workers and apply)
    drain_cap_s: float = 120.0
    allowance_s: float = 0.02  # scheduling allowance on top of CALL_TIMEOUT_S (2 shared cores)
    settle_s: float = 5.0  # a fault reaches this far past its end (reconnects, back-offs, the sweeper's grace)
    margin_s: float = 0.01  # a heat acknowledgement this close to the deadline is not called in time
    overlap_p: float = 0.08
    gap_s: tuple[float, float] = sched.GAP_S  # quiet time between faults, drawn in this range
    warmup_s: float = 5.0
    tail_s: float = 15.0


def purge_amqp(url: str) -> None:
    from kombu import Connection

    with Connection(url, connect_timeout=5) as conn, contextlib.suppress(Exception):  # no queue: nothing to purge
        conn.channel().queue_purge("late_obs")


def wait_for(condition: Callable[[], bool], cap_s: float, interval: float = 0.2) -> bool:
    """conftest.poll, but False when the condition never held (the soak goes on and reports)."""
    try:
        return bool(poll(condition, timeout=cap_s, interval=interval))
    except AssertionError:
        return False


def gauge(page: str | None, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", page or "", re.M)
    return float(match.group(1)) if match else -1.0


def run(cfg: Config, out: Callable[[str], None] = print) -> Report:
    t_begin = time.monotonic()
    seconds = cfg.minutes * 60
    with contextlib.ExitStack() as stack:
        if cfg.run_dir is None:
            run_dir = Path(tempfile.mkdtemp(prefix="chaos-"))
            stack.callback(shutil.rmtree, run_dir, ignore_errors=True)
        else:
            run_dir = cfg.run_dir
            run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "redis").mkdir(exist_ok=True)
        ports = ports_in(cfg.ports, 5 + cfg.workers + 1)
        cluster = ChaosCluster(run_dir / "redis", ports[:5], cfg.down_after_ms)
        stack.callback(cluster.stop)
        cluster.start()
        proxy = None
        broker_url = cluster.url(1)
        if cfg.broker == "amqp":
            purge_amqp(cfg.amqp_url)
            target = cfg.amqp_url.split("@", 1)[1].split("/", 1)[0]
            host, _, port = target.partition(":")
            proxy = TcpProxy(ports[-1], (host, int(port or 5672)))
            proxy.start()
            stack.callback(proxy.stop)
            broker_url = cfg.amqp_url.replace(target, f"127.0.0.1:{ports[-1]}")
        env = {k: v for k, v in os.environ.items() if not OBSERVER_VARS.match(k)}
        observer = {"REDIS_URL": cluster.url(0), "CELERY_BROKER_URL": broker_url, "P28_METRICS_ADDR": "127.0.0.1",
                    **cfg.observer_env}
        env.update(observer)
        workers = Workers(observer, run_dir, ports[5:5 + cfg.workers])
        stack.callback(workers.stop_all)
        workers.start_all()
        port0 = workers.slots[0].metrics_port
        if not wait_for(lambda: gauge(scrape(port0), "p28_late_obs_wake_listeners_up") >= cfg.workers, 60):
            out("CHAOS warning: the workers' wake listeners were not all up after 60 s; going on")
        (run_dir / "metrics_start.prom").write_text(scrape(port0) or "")

        faults = sched.draw(cfg.seed, seconds, sched.AMQP_KINDS if cfg.broker == "amqp" else sched.REDIS_KINDS,
                            cfg.down_after_ms, cfg.workers, cfg.warmup_s, cfg.tail_s, cfg.overlap_p, cfg.gap_s)
        out(sched.describe(faults, cfg.seed, seconds, cfg.down_after_ms, cfg.broker))
        (run_dir / "schedule.json").write_text(json.dumps([f.as_dict() for f in faults], indent=1))
        load_start = time.time() + 3.0  # the apply process imports the observer meanwhile
        settings = Settings.from_env(env)
        (run_dir / "settings.json").write_text(json.dumps({
            **{k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
            "max_wait_ms": settings.late_obs_max_wait_ms, "call_cap_s": CALL_TIMEOUT_S,
            "load_start": load_start, "load_end": load_start + seconds, "observer": observer}, indent=1))

        tail = StreamTail(cluster.sentinel_addrs, SERVICE, 0, run_dir / "stream_tail.jsonl")
        tail.start()
        stack.callback(tail.stopping.set)
        timeline = MetricsTimeline([slot.metrics_port for slot in workers.slots], run_dir / "metrics_timeline.jsonl")
        timeline.start()
        stack.callback(timeline.stopping.set)
        apply = spawn(stack, run_dir / "apply.out", env, "tests.chaos.apply", "--log", str(run_dir / "apply.jsonl"),
                      "--rate", str(cfg.rate), "--seconds", str(seconds), "--start", str(load_start),
                      "--burst-size", str(cfg.burst_size), "--trace", str(run_dir / "outbox.trace"))
        (run_dir / "apply.jsonl").touch()
        heat = spawn(stack, run_dir / "heatbridge.out", env, "tests.chaos.heatbridge",
                     "--apply-log", str(run_dir / "apply.jsonl"), "--log", str(run_dir / "heat.jsonl"),
                     "--sentinels", ",".join(f"{h}:{p}" for h, p in cluster.sentinel_addrs),
                     "--service", SERVICE, "--db", "0", "--seed", str(cfg.seed))
        runner = FaultRunner(cluster, workers, proxy, apply.pid, run_dir, load_start, load_start + seconds, cfg.tail_s)
        stack.callback(runner.stopping.set)
        runner.run(faults)

        t_load_end = time.monotonic()
        finished = wait_for(lambda: apply.poll() is not None, max(0.0, load_start + seconds - time.time()) + 60)
        out(f"CHAOS apply process {'exited ' + str(apply.returncode) if finished else 'still running: killed'}")
        wait_for(lambda: heat.poll() is not None, 40)
        data = master_client(cluster.sentinel_addrs, SERVICE, 0)

        def drained() -> bool:
            try:
                return int(data.zcard(INFLIGHT)) == 0
            except Exception:  # Redis still recovering: not yet
                return False

        t_drain = time.monotonic()
        gone = wait_for(drained, cfg.drain_cap_s, 0.5)
        drain_s = time.monotonic() - t_drain
        out(f"CHAOS drain: {'leases gone' if gone else 'cap reached'} after {drain_s:.1f} s")
        tail.finish()
        timeline.stopping.set()
        final = write_final(data, run_dir, workers.live_metrics_port())
        out(f"CHAOS final reads: {json.dumps(final)}; stream entries tailed {tail.read}")
        report = check(load(run_dir))
        out(render(report))
        out(f"CHAOS run time: {time.monotonic() - t_begin:.0f} s (load and faults {t_load_end - t_begin:.0f} s "
            f"from the start, drain {drain_s:.0f} s); run folder {run_dir}"
            f"{' (kept)' if cfg.run_dir else ' (removed)'}")
        return report


def spawn(stack: contextlib.ExitStack, log: Path, env: dict[str, str], module: str,
          *args: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env, stdout=f,
                                stderr=subprocess.STDOUT)

    def stop() -> None:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)

    stack.callback(stop)
    return proc
