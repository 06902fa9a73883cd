"""Small tools that keep the apply layer's process quiet and unblocked when Redis or the broker misbehave."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..core.connections import describe
from ..core.timings import BREAKER_FIRST_OPEN_S, BREAKER_MAX_OPEN_S, LOG_EVERY_S, RETRY_MAX_S, RETRY_S

log = logging.getLogger("observer_tasks")


def backoff(failing_for: float) -> float:
    """The wait before the next attempt (s): RETRY_S, growing with how long it has failed, up to RETRY_MAX_S."""
    return min(RETRY_MAX_S, max(RETRY_S, failing_for))


class ThrottledLog:
    """Logs a problem at most once per LOG_EVERY_S, with how many were not logged."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.last = -LOG_EVERY_S
        self.quiet = 0
        self.lock = threading.Lock()

    def warning(self, message: str, exc_info: bool = False) -> None:
        """Log at most one line per period; with exc_info, the traceback too (so at most one per period)."""
        with self.lock:
            now = self.clock()
            if now - self.last < LOG_EVERY_S:
                self.quiet += 1
                return
            suffix = f" ({self.quiet} more since the last report)" if self.quiet else ""
            self.last, self.quiet = now, 0
        log.warning("P2.8A observer: %s%s", message, suffix, exc_info=exc_info)


class Breaker:
    """Opens after a failure, refusing at once; lets one attempt through when its period ends.

    The period is BREAKER_FIRST_OPEN_S, doubling up to BREAKER_MAX_OPEN_S while failures continue. It logs one
    line each time it opens (one per period during an outage, never a traceback), with how many calls it
    refused since the last line.
    """

    def __init__(self, what: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self.clock = clock
        self.open_until = 0.0
        self.period = BREAKER_FIRST_OPEN_S
        self.refused = 0
        self.lock = threading.Lock()

    def is_open(self) -> bool:
        return self.clock() < self.open_until

    def refuse(self) -> None:
        with self.lock:
            self.refused += 1

    def failed(self, exc: BaseException) -> None:
        with self.lock:
            now = self.clock()
            if now < self.open_until:
                return  # another thread's failure already opened it: one line per period
            period, self.open_until = self.period, now + self.period
            self.period = min(self.period * 2, BREAKER_MAX_OPEN_S)
            refused, self.refused = self.refused, 0
        more = f"; {refused} call(s) refused since the last report" if refused else ""
        log.warning("P2.8A observer: %s unavailable (%s); refusing calls for %.0fs%s", self.what, describe(exc),
                    period, more)

    def close(self) -> None:
        """The service answered again: callers may try at once."""
        with self.lock:
            self.open_until, self.period = 0.0, BREAKER_FIRST_OPEN_S
