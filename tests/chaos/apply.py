"""The soak's apply process (its own Python process): for each plan, ``observe`` then ``observe_late`` at a fixed
rate, one JSON line per call; on SIGUSR1 a burst of plans as fast as it can (the burst fault).

``python -m tests.chaos.apply --log FILE --rate 40 --seconds S --start EPOCH --burst-size N``, with the
observer's variables in the environment. Lines (``apply.jsonl``):

- ``{"kind": "call", "plan", "obs_point", "t" (time.time() at the call's start), "dur" (perf_counter, s),
  "result", "raised" (the exception's repr, or null), "burst" (the burst's number, or null)}``;
- ``{"kind": "burst", "n", "start", "end", "plans"}`` after each burst; ``{"kind": "end", "t", "plans"}`` last.

It exits normally (so the observer's exit flush runs) once the run's length has passed.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import time
from collections.abc import Callable
from typing import IO, Any

from observer_tasks import observe, observe_late

from ..timing import hold

SYMBOL = "BTCUSDT"
DECISION = "EXECUTE"
CALLS: tuple[tuple[str, Callable[[str, str, str], str]], ...] = (
    ("create_apply_plan", observe), ("publish_plan_post", observe_late))


class Apply:
    def __init__(self, log: IO[str]) -> None:
        self.log = log
        self.bursts_asked = 0
        self.bursts_done = 0

    def write(self, record: dict[str, Any]) -> None:
        self.log.write(json.dumps(record, separators=(",", ":")) + "\n")

    def plan(self, plan: str, burst: int | None) -> None:
        for obs_point, call in CALLS:
            t = time.time()
            p0 = time.perf_counter()
            raised = None
            result: str | None = None
            try:
                result = call(plan, SYMBOL, DECISION)
            except Exception as exc:  # the contract says it never raises: recorded if it does
                raised = repr(exc)
            dur = time.perf_counter() - p0
            self.write({"kind": "call", "plan": plan, "obs_point": obs_point, "t": t, "dur": dur, "result": result,
                        "raised": raised, "burst": burst})
        self.log.flush()  # HeatBridge tails this log: it schedules the plan's heat from the call's line

    def burst(self, size: int) -> None:
        n = self.bursts_done
        start = time.time()
        for j in range(size):
            self.plan(f"b{n}-{j:04d}", n)
        self.write({"kind": "burst", "n": n, "start": start, "end": time.time(), "plans": size})
        self.log.flush()
        self.bursts_done += 1

    def run(self, rate: float, seconds: float, start: float, burst_size: int) -> int:
        i = 0
        while True:
            now = time.time()
            if now >= start + seconds:
                break
            if self.bursts_done < self.bursts_asked:
                self.burst(burst_size)
                continue
            due = start + i / rate
            if now < due:
                hold(min(due - now, 0.02), "pacing the load")
                continue
            self.plan(f"c{i:06d}", None)
            i += 1
        self.write({"kind": "end", "t": time.time(), "plans": i})
        self.log.flush()
        return i


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.apply", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", required=True, help="the JSON-lines log to append to")
    parser.add_argument("--rate", type=float, default=40.0, help="plans per second (default 40)")
    parser.add_argument("--seconds", type=float, required=True, help="how long to call, from --start")
    parser.add_argument("--start", type=float, default=0.0, help="epoch time of the first plan (default: now)")
    parser.add_argument("--burst-size", type=int, default=300, help="plans per burst (SIGUSR1)")
    parser.add_argument("--trace", help="write the outbox's DEBUG trace (each pass's calls and replies) here")
    args = parser.parse_args(argv)
    if args.trace:
        handler = logging.FileHandler(args.trace)
        handler.setFormatter(logging.Formatter("%(created).3f %(threadName)s %(message)s"))
        logging.getLogger("observer_tasks.outbox").addHandler(handler)
        logging.getLogger("observer_tasks.outbox").setLevel(logging.DEBUG)
    with open(args.log, "a", buffering=1 << 16) as log:
        app = Apply(log)

        def ask_burst(_signum: int, _frame: Any) -> None:
            app.bursts_asked += 1

        signal.signal(signal.SIGUSR1, ask_burst)
        app.run(args.rate, args.seconds, args.start or time.time(), args.burst_size)


if __name__ == "__main__":
    main()
