"""The ledger's sweeper and the worker's heartbeat: one thread in each worker's main process.

Sweeper: kombu's Redis transport can lose a message when a worker dies between popping it and recording it
as unacked, a broker without persistence loses messages on restart, and an apply process can die before its
publisher sends a first message. The lease set knows every admitted plan, so every lease still present
``sweep_grace_ms`` after its deadline (Redis time) is recorded by the sweep step (sweep.lua),
with the cause in debug_json, and counted in p28_late_obs_recovered_total: as missing when the publisher
noted that its first message never reached the broker, as redis_error when this sweeper found Redis
unreachable during the plan's wait (outages, not a slow HeatBridge: operators must not raise MAX_WAIT_MS for
them), otherwise as timeout. Outage windows are kept in Redis time too. A lease whose record fails (the
stream's key of the wrong type, say) wrote nothing and stays: it is reported, passed over so it never blocks
the others, and recorded by a later sweep once the cause is gone.

Heartbeat: every HEARTBEAT_S the worker writes its entry in ``quantum:p28:workers`` and the wake path's
health (heartbeat.lua); it restarts a wake listener thread that died.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable

from ..core.settings import HEARTBEAT_S, SWEEP_INTERVAL_S
from ..core.store import AccessRefused, Outcome, Store, Unavailable, follow_master, master_address
from .wake import WakeListener

log = logging.getLogger("observer_tasks.sweeper")

Outage = tuple[int, int]  # (last good contact, first good contact after failures), Redis ms


class Sweeper(threading.Thread):
    """Heartbeat every HEARTBEAT_S, sweep every SWEEP_INTERVAL_S, until stopped."""

    def __init__(self, store: Store, nodename: str,
                 make_listener: Callable[[], WakeListener] | None) -> None:
        super().__init__(name="p28-sweeper", daemon=True)
        self.store = store
        self.nodename = nodename
        self.make_listener = make_listener
        self.listener = make_listener() if make_listener else None
        self.stopped = threading.Event()
        # Recent Redis outages this sweeper saw; old ones cannot overlap a lease still in the ledger.
        self.outages: deque[Outage] = deque(maxlen=32)
        self.last_contact_ms: int | None = None
        self.down_since_ms: int | None = None
        self.next_sweep = 0.0
        self.refused = False  # Redis refused this worker's user (NOPERM, WRONGPASS ...) since the last beat
        #: Called with the outcomes of the plans each sweep recorded (their final state in Flower).
        self.on_recorded: Callable[[dict[str, Outcome], str], None] | None = None

    def run(self) -> None:
        if self.listener:
            self.listener.start()
        while True:
            try:
                self.beat()
                if time.monotonic() >= self.next_sweep:
                    self.next_sweep = time.monotonic() + SWEEP_INTERVAL_S
                    self.sweep()
            except Unavailable as exc:
                if self.down_since_ms is None and self.last_contact_ms is not None:
                    self.down_since_ms = self.last_contact_ms
                    log.warning("P2.8A.3: sweeper cannot reach Redis: %s", exc)
            except AccessRefused as exc:
                if not self.refused:  # once until Redis accepts the user again
                    self.refused = True
                    log.error("P2.8A.3: Redis refuses the worker's user (%s): a configuration error, not an outage; "
                              "fix the password in REDIS_URL or the user's ACL (deploy/redis/users.acl)", exc)
            except Exception:
                log.exception("P2.8A.3: sweeper failed; trying again in %ss", HEARTBEAT_S)
            if self.stopped.wait(HEARTBEAT_S):
                break
        if self.listener:
            self.listener.stop()

    def beat(self) -> None:
        listener = self.listener
        restarted = False
        if listener is not None and not listener.is_alive() and self.make_listener and not self.stopped.is_set():
            log.error("P2.8A.3: wake listener thread died; starting a new one")
            resyncs = listener.resyncs
            listener = self.listener = self.make_listener()
            listener.resyncs = resyncs
            listener.start()
            restarted = True
        state = listener.state() if listener else {"wake": "off", "last_push_age_ms": None, "resyncs": 0}
        if restarted:
            state["wake"] = "reconnecting"  # it was down: the chain polls at POLL_MS until the next beat
        # Which server this worker's connections (and its listener's tracking) are on, for `status`.
        info = {"pid": os.getpid(), "host": socket.gethostname(), **state,
                "redis_master": master_address(self.store.client.connection_pool)}
        follow_master(self.store.client)
        now = self.store.heartbeat(self.nodename, info, str(state["wake"]))
        if self.down_since_ms is not None:
            self.outages.append((self.down_since_ms, now))
            self.down_since_ms = None
        self.last_contact_ms = now
        self.refused = False

    def sweep(self) -> None:
        swept = self.store.sweep(list(self.outages))
        if swept.outcomes and self.on_recorded is not None:
            self.on_recorded(swept.outcomes, "sweep")
        if swept.recorded:
            log.warning("P2.8A.3: sweeper recorded %d overdue plan(s)", swept.recorded)
        if swept.freed:
            log.error("P2.8A.3: sweeper freed %d lease(s) it could not read: %s", len(swept.freed),
                      " ".join(swept.freed[:10])[:300])
        if swept.skipped:
            plan, error = next(iter(swept.skipped.items()))
            log.error("P2.8A.3: sweeper could not record %d overdue plan(s), their leases kept (%s: %s); "
                      "it tries again every %ss", len(swept.skipped), plan, error, SWEEP_INTERVAL_S)
