"""What a worker process's services share with its task threads: one object, attached to the worker's app.

The settings step builds it once per worker process and attaches it to the worker and to the app the tasks run
on (``app.observer_worker``); the other steps and the tasks read it from there, never from a module global. A
task that runs where no worker built one (an eager call in a test) gets one built from the environment.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any

from ..core.connections import redis_client
from ..core.ledger import Ledger
from ..core.settings import Settings
from ..core.timings import GAP_MIN_MS, LOOKUP_TIMEOUT_S

#: Plans remembered as decided by this process's wake step or sweeper (see Decided).
DECIDED_MAX = 20_000


class Decided:
    """The plans this process's wake step and sweeper recorded lately (plan -> monotonic time), oldest first. A
    look of one of them would only find its lease gone, so the look ends without asking Redis (the worker's pool
    is threads: the looks run in this process)."""

    def __init__(self) -> None:
        self.plans: OrderedDict[str, float] = OrderedDict()
        self.lock = threading.Lock()

    def add(self, plan_ids: Any) -> None:
        now = time.monotonic()
        with self.lock:
            self.plans.update(dict.fromkeys(plan_ids, now))
            while len(self.plans) > DECIDED_MAX:
                self.plans.popitem(last=False)

    def recently(self, plan_id: str, within_s: float) -> bool:
        """Recorded here within ``within_s`` (the dedupe TTL: no new lease for the plan can exist before)."""
        with self.lock:
            at = self.plans.get(plan_id)
        return at is not None and time.monotonic() - at < within_s


class GapWatch:
    """This process's view of whether Redis answers: the Redis time of its last prompt answer, and from when it
    stopped answering (a failed call, or one slower than GAP_MIN_MS). The heartbeat writes the gap to Redis when
    Redis answers again (the looks and the sweeper then decide by it); until then the sweeper waits and a look
    passes the start of the gap along."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last_answer_ms = 0
        self.down_since_ms = 0  # 0: no gap pending
        #: Since when (Redis ms) this process has reached Redis without a gap: in its heartbeat, so that another
        #: worker's gap it spans is known to be that worker's own (its link), not Redis's.
        self.answering_since_ms = 0

    def answered(self, redis_ms: int, took_s: float) -> int:
        """A call answered at ``redis_ms`` after ``took_s``: returns the start of a gap to record (0: none)."""
        with self.lock:
            if took_s * 1000 >= GAP_MIN_MS and not self.down_since_ms:
                self.down_since_ms = self.last_answer_ms or int(redis_ms - took_s * 1000)
            self.last_answer_ms = max(self.last_answer_ms, redis_ms)
            if not self.answering_since_ms and not self.down_since_ms:
                self.answering_since_ms = redis_ms
            return self.down_since_ms

    def failed(self) -> None:
        with self.lock:
            if not self.down_since_ms and self.last_answer_ms:
                self.down_since_ms = self.last_answer_ms

    def recorded(self, start_ms: int, end_ms: int) -> None:
        with self.lock:
            if self.down_since_ms == start_ms:
                self.down_since_ms = 0
                self.answering_since_ms = end_ms

    @property
    def pending(self) -> int:
        """The start of a gap not yet written to Redis (Redis ms), or 0."""
        return self.down_since_ms


class WorkerContext:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.looks = Ledger(settings, redis_client(settings.redis_url, LOOKUP_TIMEOUT_S, "look", settings))
        self.decided = Decided()
        self.gaps = GapWatch()
        #: The Redis clients of this process's services: the heartbeat has each follow the master Sentinel names.
        self.clients: list[Any] = [self.looks.client]
        #: Sends the final state of plans decided outside a task (the final-states step sets it).
        self.final_states: Any = None


_fallback_lock = threading.Lock()


def context_of(app: Any) -> WorkerContext:
    """The worker context on this app; built from the environment when no worker step built one."""
    ctx = getattr(app, "observer_worker", None)
    if ctx is None:
        with _fallback_lock:
            ctx = getattr(app, "observer_worker", None) or WorkerContext(Settings.from_env())
            app.observer_worker = ctx
    return ctx
