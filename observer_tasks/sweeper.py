"""The ledger's sweeper: records every lease that outlived its deadline with no observation.

kombu's Redis transport can lose a message when a worker dies between popping
it and recording it as unacked, and a message can be lost with a broker that
keeps nothing on disk. The lease set knows every admitted plan, so any lease
still present SWEEP_GRACE_MS after its plan's deadline is recorded here, with
the cause in debug_json, and counted in p28_late_obs_recovered_total: as
redis_error when the sweeper itself found Redis unreachable during the plan's
wait (an outage, not a slow HeatBridge: operators must not raise MAX_WAIT_MS
for it), otherwise as timeout. Recording is deduplicated, so sweepers in many
workers can run at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence

from . import keys as K
from .heat import Heat
from .settings import SWEEP_GRACE_MS, SWEEP_INTERVAL_S
from .store import REDIS_DOWN, Store

log = logging.getLogger("observer_tasks.sweeper")


Outage = tuple[int, int]  # (last good contact, first good contact after failures), epoch ms


def sweep_once(store: Store, now_ms: int | None = None, outages: Sequence[Outage] = ()) -> int:
    """Record every overdue lease; returns how many this call recorded."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    recorded = 0
    while True:
        batch = store.overdue_leases(now_ms)
        if not batch:
            return recorded
        for plan_id, payload in batch:
            if payload is None or not K.valid_plan_id(plan_id):  # not written by our admission: just free it
                log.error("P2.8A.3: sweeper freed a lease it cannot record: %.200r", plan_id)
                store.release(plan_id)
                continue
            cause = f"no observation {SWEEP_GRACE_MS}ms after the deadline (message lost or worker stopped)"
            in_outage = any(start <= payload.deadline_ms and end >= payload.published_ms for start, end in outages)
            if in_outage:
                cause += "; Redis was unreachable during the wait"
            if store.record(plan_id=plan_id, symbol=payload.symbol, obs_point=K.OBS_LATE, heat=Heat(False, ""),
                            reason="redis_error" if in_outage else "timeout", apply_decision=payload.apply_decision,
                            debug={"cause": cause, "swept": True},
                            extra={"wait_ms": str(max(0, now_ms - payload.published_ms)), "polls": "0"},
                            also_count=("recovered",)):
                recorded += 1


class Sweeper(threading.Thread):
    """A daemon thread that sweeps every SWEEP_INTERVAL_S until stopped."""

    def __init__(self, store: Store) -> None:
        super().__init__(name="p28-sweeper", daemon=True)
        self.store = store
        self.stopped = threading.Event()
        # Recent Redis outages this sweeper saw; old ones cannot overlap a lease still in the ledger.
        self.outages: deque[Outage] = deque(maxlen=32)
        self.last_contact_ms = int(time.time() * 1000)
        self.down_since_ms: int | None = None

    def run(self) -> None:
        while not self.stopped.wait(SWEEP_INTERVAL_S):
            try:
                if self.down_since_ms is not None:
                    self.store.client.ping()
                    self.outages.append((self.down_since_ms, int(time.time() * 1000)))
                    self.down_since_ms = None
                n = sweep_once(self.store, outages=self.outages)
                self.last_contact_ms = int(time.time() * 1000)
                if n:
                    log.warning("P2.8A.3: sweeper recorded %d overdue plan(s)", n)
            except REDIS_DOWN as exc:
                if self.down_since_ms is None:
                    self.down_since_ms = self.last_contact_ms
                log.warning("P2.8A.3: sweeper cannot reach Redis: %r", exc)
            except Exception:
                log.exception("P2.8A.3: sweeper failed; trying again in %ss", SWEEP_INTERVAL_S)



