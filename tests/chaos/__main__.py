"""``python -m tests.chaos``: the seeded chaos soak and its checker (``make chaos SEED=N MINUTES=M``).

Starts on loopback a Redis master, a replica and three sentinels (AOF on), two real workers, an apply process
(observe + observe_late at --rate plans/s, every call logged) and a HeatBridge stand-in (70% of plans' heat
after a lognormal delay, every acknowledged write logged with Redis's time); prints the fault schedule drawn
from --seed, carries it out over --minutes, drains (until no lease is left, or a cap), then runs the
independent checker and prints its table. Exit status 0 when every figure is zero, 1 otherwise, 2 on a
harness error. Ports from --ports (default 7100-7199); with --broker amqp the broker is RabbitMQ's vhost in
--amqp-url, reached through a proxy on one of those ports that the broker fault stops and starts.
Everything started is stopped, and the run's folder removed unless --keep names one.

Examples:
  python -m tests.chaos --seed 3 --minutes 2
  python -m tests.chaos --seed 3 --minutes 2 --broker amqp --down-after-ms 30000 --keep /tmp/chaos-3
  python -m tests.chaos --check /tmp/chaos-3        (the checker again on a kept run's files)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

from .soak import OBSERVER_VARS, Config


def parse(argv: list[str] | None) -> argparse.Namespace:
    d = Config()
    p = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=d.seed, help="the schedule's and HeatBridge's seed (default 1)")
    p.add_argument("--minutes", type=float, default=d.minutes, help="length of the load (default 2)")
    p.add_argument("--broker", choices=("redis", "amqp"), default=d.broker, help="Celery broker (default redis)")
    p.add_argument("--down-after-ms", type=int, default=d.down_after_ms,
                   help="Sentinel's down-after-milliseconds (default 5000; production's default is 30000)")
    p.add_argument("--rate", type=float, default=d.rate, help="plans per second (default 40)")
    p.add_argument("--burst-size", type=int, default=d.burst_size, help="plans per burst fault (default 300)")
    p.add_argument("--ports", default=d.ports, help="port range for servers, /metrics, proxy (default 7100-7199)")
    p.add_argument("--amqp-url", default=d.amqp_url, help="RabbitMQ vhost for --broker amqp (default .../h1)")
    p.add_argument("--env", action="append", default=[], metavar="VAR=VALUE",
                   help="an observer variable for workers and apply process (repeatable)")
    p.add_argument("--allowance-ms", type=float, default=d.allowance_s * 1000,
                   help="scheduling allowance over the 50 ms call cap before a call counts as slow (default 20)")
    p.add_argument("--settle-s", type=float, default=d.settle_s,
                   help="how far past its end a fault's reach extends for attribution (default 5)")
    p.add_argument("--overlap-p", type=float, default=d.overlap_p, help="chance a fault overlaps the previous one")
    p.add_argument("--keep", type=Path, help="run in this folder and keep it (logs, stream, records)")
    p.add_argument("--check", type=Path, metavar="RUN_DIR", help="only run the checker on a kept run's folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from .checker import check
    from .evidence import load
    from .table import render

    if args.check:
        report = check(load(args.check))
        print(render(report))
        return 1 if report.failed else 0
    for name in [n for n in os.environ if OBSERVER_VARS.match(n)]:
        del os.environ[name]  # the shell's observer settings must not leak into the soak's processes

    def terminate(_signum: int, _frame: Any) -> None:
        raise SystemExit(143)  # unwinds the soak's ExitStack: every process stopped, the folder removed

    signal.signal(signal.SIGTERM, terminate)
    cfg = Config(seed=args.seed, minutes=args.minutes, broker=args.broker, down_after_ms=args.down_after_ms,
                 rate=args.rate, burst_size=args.burst_size, ports=args.ports, amqp_url=args.amqp_url,
                 run_dir=args.keep, observer_env=dict(v.split("=", 1) for v in args.env),
                 allowance_s=args.allowance_ms / 1000, settle_s=args.settle_s, overlap_p=args.overlap_p)
    from .soak import run

    try:
        report = run(cfg, lambda line: print(line, flush=True))
    except Exception as exc:
        print(f"CHAOS harness error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from exc
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
