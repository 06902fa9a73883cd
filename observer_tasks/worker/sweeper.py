"""The ledger's sweeper: one thread in each worker's main process.

kombu's Redis transport can lose a message when a worker dies between popping it and recording it as unacked,
a broker without persistence loses messages on restart, an apply process can die before its outbox sends a
first message, and while every worker is down nobody looks at all. The ledger knows every admitted plan, so
every lease still there ``sweep_grace_ms`` after its deadline (Redis time) is decided by the sweep step
(sweep.lua) by the same rule as a look: the heat proves `ok`, a Redis gap the workers recorded makes it
`redis_error`, a first message that never reached the broker `missing`, otherwise `timeout`; with the cause
in debug_json, counted in p28_late_obs_recovered_total. A plan whose record fails (the stream's key of the
wrong type, say) wrote nothing and stays: it is reported, passed over so it never blocks the others, and
recorded by a later sweep once the cause is gone.

The sweeper waits while this worker has seen Redis fail and its heartbeat has not yet written that gap: a plan
decided in that moment would miss the gap that explains it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ..core.connections import AccessRefused, Unavailable
from ..core.ledger import Ledger, Recorded
from ..core.timings import SWEEP_INTERVAL_S
from .context import GapWatch

log = logging.getLogger("observer_tasks.sweeper")


class Sweeper(threading.Thread):
    """Sweeps every SWEEP_INTERVAL_S until stopped."""

    def __init__(self, ledger: Ledger, gaps: GapWatch,
                 on_recorded: Callable[[dict[str, Recorded], str], None] | None = None) -> None:
        super().__init__(name="p28-sweeper", daemon=True)
        self.ledger, self.gaps, self.on_recorded = ledger, gaps, on_recorded
        self.stopped = threading.Event()
        self.refused = False  # Redis refused this worker's user (NOPERM, WRONGPASS ...) since the last sweep

    def run(self) -> None:
        while not self.stopped.wait(SWEEP_INTERVAL_S):
            if self.gaps.pending:
                continue  # the heartbeat writes the gap first
            try:
                self.sweep()
                self.refused = False
            except Unavailable as exc:
                self.gaps.failed()
                log.warning("P2.8A.3: sweeper cannot reach Redis: %s", exc)
            except AccessRefused as exc:
                if not self.refused:  # once until Redis accepts the user again
                    self.refused = True
                    log.error("P2.8A.3: Redis refuses the worker's user (%s): a configuration error, not an outage; "
                              "fix the password in REDIS_URL or the user's ACL (deploy/redis/users.acl)", exc)
            except Exception:
                log.exception("P2.8A.3: sweeper failed; trying again in %ss", SWEEP_INTERVAL_S)

    def sweep(self) -> None:
        swept = self.ledger.sweep()
        if swept.recorded and self.on_recorded is not None:
            self.on_recorded(swept.recorded, "sweep")
        if swept.recorded:
            log.warning("P2.8A.3: sweeper recorded %d overdue plan(s)", len(swept.recorded))
        if swept.freed:
            log.error("P2.8A.3: sweeper freed %d lease(s) it could not read: %s", len(swept.freed),
                      " ".join(swept.freed[:10])[:300])
        if swept.skipped:
            plan, error = next(iter(swept.skipped.items()))
            log.error("P2.8A.3: sweeper could not record %d overdue plan(s), their leases kept (%s: %s); "
                      "it tries again every %ss", len(swept.skipped), plan, error, SWEEP_INTERVAL_S)
