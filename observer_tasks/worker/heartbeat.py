"""The worker's heartbeat: one thread in each worker's main process, every HEARTBEAT_S.

It writes the worker's entry in ``quantum:p28:workers`` (seen on Redis's clock, pid, host, the wake listener's
state, the limits the worker runs with), the wake path's health (heartbeat.lua decides it for every worker),
and the Redis gap this worker saw (GapWatch: a call that failed, or answered later than GAP_MIN_MS), merged with
the other workers' record of the same outage. It also starts a new wake listener when the old one's thread died.

Its own thread rather than the worker's timer: a beat waits up to MAIN_TIMEOUT_S for a Redis that stalls, and
the timer also runs the worker's countdowns.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from ..core.connections import AccessRefused, Unavailable, follow_master, master_address
from ..core.ledger import Ledger
from ..core.timings import HEARTBEAT_S
from .context import GapWatch

log = logging.getLogger("observer_tasks.heartbeat")


class Heartbeat(threading.Thread):
    def __init__(self, ledger: Ledger, nodename: str, gaps: GapWatch, wake: Callable[[], dict[str, Any]],
                 limits: dict[str, Any], followed: list[Any] | None = None) -> None:
        super().__init__(name="p28-heartbeat", daemon=True)
        self.ledger, self.nodename, self.gaps, self.wake, self.limits = ledger, nodename, gaps, wake, limits
        self.followed = followed if followed is not None else []  # the worker's other Redis clients
        self.stopped = threading.Event()
        self.refused = False

    def run(self) -> None:
        while True:
            try:
                self.beat()
                self.refused = False
            except Unavailable as exc:
                if not self.gaps.pending:
                    log.warning("P2.8A.3: heartbeat cannot reach Redis: %s", exc)
                self.gaps.failed()
            except AccessRefused as exc:
                if not self.refused:
                    self.refused = True
                    log.error("P2.8A.3: Redis refuses the worker's user (%s): a configuration error, not an outage; "
                              "fix the password in REDIS_URL or the user's ACL (deploy/redis/users.acl)", exc)
            except Exception:
                log.exception("P2.8A.3: heartbeat failed; trying again in %ss", HEARTBEAT_S)
            if self.stopped.wait(HEARTBEAT_S):
                return

    def beat(self) -> None:
        state = self.wake()  # the listener's state (restarted first if its thread died)
        # Which server this worker's connections (and its listener's tracking) are on, for `status`.
        info = {"pid": os.getpid(), "host": socket.gethostname(), **state, **self.limits,
                "redis_master": master_address(self.ledger.client.connection_pool),
                "answering_since_ms": self.gaps.answering_since_ms}
        for client in (self.ledger.client, *self.followed):  # every role of this worker leaves a demoted master
            follow_master(client)
        start, gap_start = time.monotonic(), self.gaps.pending
        now = self.ledger.heartbeat(self.nodename, info, str(state["wake"]), gap_start)
        if gap_start:
            log.warning("P2.8A.3: Redis answers again after %.1fs (a gap, unless another worker reached Redis "
                        "throughout)", (now - gap_start) / 1000)
            self.gaps.recorded(gap_start, now)
            # This beat's own wait lies inside the gap it just recorded (which ends at its answer): it must not
            # open another from the last answer before the outage, which would stretch the gap by one more beat.
            self.gaps.answered(now, 0.0)
        elif self.gaps.answered(now, time.monotonic() - start):  # this beat itself was too slow: the next records it
            log.warning("P2.8A.3: Redis answered the heartbeat late; recording a gap")
