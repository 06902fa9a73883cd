"""The fault schedule, drawn from a seed (``random.Random(seed)``), printed before the run.

Faults come one after another: each starts a random gap after the previous one has ended. With a small
probability (``overlap_p``) the seed makes a fault start while the previous one is still running (its
``offset`` after the previous one's start): the schedule says so (``overlap``). Kinds are drawn as a shuffled
cycle (every kind once, in the seed's order, before any kind comes again), so even a short run meets each.
No fault starts in the run's first ``warmup_s`` or is planned to end in its last ``tail_s`` (the load goes on,
so plans called after the last fault show the recovery).

Lengths (``duration``, seconds): ``worker_kill`` how long the worker stays dead before it is started again;
``worker_stop`` SIGSTOP to SIGCONT; ``master_stall`` SIGSTOP to SIGCONT of the master, at most 70% of
down-after (and 8 s); ``busy`` the script's run before SCRIPT KILL (6-8 s, past Redis's 5 s limit);
``broker_stop`` proxy stopped to started; ``master_kill`` and ``burst`` last as long as they take (the
schedule's ``duration`` is an estimate used to plan the next one's start).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

REDIS_KINDS = ("worker_kill", "worker_stop", "master_stall", "master_kill", "busy", "burst")
AMQP_KINDS = (*REDIS_KINDS, "broker_stop")
GAP_S = (3.0, 12.0)


@dataclass(frozen=True)
class Fault:
    n: int
    kind: str
    at: float  # planned start, seconds from the load's start (an estimate: faults run one after another)
    duration: float
    target: int | None = None  # the worker slot, for worker faults
    gap: float = 0.0  # seconds after the previous fault ended (when not an overlap)
    overlap: bool = False  # starts ``offset`` seconds after the previous fault started, while it runs
    offset: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def duration_of(kind: str, rng: random.Random, down_after_s: float) -> float:
    if kind == "worker_kill":
        return rng.uniform(0.5, 6.0)
    if kind in ("worker_stop", "broker_stop"):
        return rng.uniform(1.0, 10.0)
    if kind == "master_stall":
        return rng.uniform(0.3, min(0.7 * down_after_s, 8.0))
    if kind == "busy":
        return rng.uniform(6.0, 8.0)
    if kind == "master_kill":
        return down_after_s + 4.0  # estimate: detection, election, the old master back as a replica
    return 1.0  # burst


def draw(seed: int, seconds: float, kinds: tuple[str, ...], down_after_ms: int, workers: int = 2,
         warmup_s: float = 5.0, tail_s: float = 15.0, overlap_p: float = 0.08,
         gap_s: tuple[float, float] = GAP_S) -> list[Fault]:
    rng = random.Random(seed)
    faults: list[Fault] = []
    cycle: list[str] = []
    at = warmup_s
    while True:
        if not cycle:
            cycle = list(kinds)
            rng.shuffle(cycle)
        kind = cycle.pop()
        duration = round(duration_of(kind, rng, down_after_ms / 1000), 2)
        gap = round(rng.uniform(*gap_s), 2)
        overlap = bool(faults) and rng.random() < overlap_p
        target = rng.randrange(workers) if kind in ("worker_kill", "worker_stop") else None
        offset = 0.0
        if overlap:
            prev = faults[-1]
            offset = round(rng.uniform(0.0, prev.duration), 2)
            start = prev.at + offset
            if target is not None and prev.target == target:
                target = (target + 1) % workers  # two faults on one worker at once would undo each other
        else:
            start = max(f.at + f.duration for f in faults) + gap if faults else at  # after all have ended
        if start + duration > seconds - tail_s:
            return faults
        faults.append(Fault(len(faults), kind, round(start, 2), duration, target, gap if not overlap else 0.0,
                            overlap, offset))


def describe(faults: list[Fault], seed: int, seconds: float, down_after_ms: int, broker: str) -> str:
    lines = [f"CHAOS schedule: seed {seed}, {seconds:.0f} s of load, broker {broker}, down-after {down_after_ms} ms, "
             f"{len(faults)} faults ({sum(f.overlap for f in faults)} overlapping)"]
    lines.append(f"  {'#':>3} {'at~s':>7} {'kind':<13} {'dur s':>6} {'target':<7} start")
    for f in faults:
        target = f"w{f.target + 1}" if f.target is not None else "-"
        when = f"OVERLAP: {f.offset:.2f} s after #{f.n - 1} started" if f.overlap else \
            (f"{f.gap:.2f} s after the previous ones end" if f.n else "first")
        lines.append(f"  {f.n:>3} {f.at:>7.1f} {f.kind:<13} {f.duration:>6.2f} {target:<7} {when}")
    return "\n".join(lines)
