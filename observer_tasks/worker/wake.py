"""The wake listener: Redis pushes every write under the heat prefix, and the wake step records the plan.

One connection per worker, named ``observer_tasks:wake``, speaking RESP2: it turns on client tracking in
broadcast mode for the heat prefix with REDIRECT to itself, then subscribes to ``__redis__:invalidate``
(Redis >= 6, no server configuration; keyspace notifications would need CONFIG SET). Every write to a heat
hash then arrives as one invalidation message, within a millisecond or two. The listener drains whatever is
readable, keeps the keys that name a valid plan id, and runs the wake step for the batch: one atomic Redis
call (observe.lua, mode 'wake') that records each plan still leased whose hash is readable. Writes to other
keys, other databases, or plans not under observation change nothing there.

Nothing depends on the push for correctness: the countdown chain keeps looking (at the safety interval
while every live worker's listener is connected, at POLL_MS otherwise), and after every (re)connect the
listener resyncs: one wake step over every leased plan, so heat written while it was away is recorded at
once. With several workers every listener sees every push; the lease lets exactly one record.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis

from ..core.store import Store, Unavailable

log = logging.getLogger("observer_tasks.wake")

#: How long one read waits for a push before the loop checks whether it should stop (s).
READ_WAIT_S = 0.5
#: Most keys handed to one wake step (one Redis call).
BATCH_MAX = 500
#: Pause before reconnecting, doubling to RECONNECT_MAX_S while Redis stays away (s).
RECONNECT_FIRST_S = 0.1
RECONNECT_MAX_S = 2.0


class WakeListener(threading.Thread):
    """Runs until ``stopped`` is set; reconnects (and resyncs) after any connection loss."""

    def __init__(self, store: Store, url: str, timeout_s: float) -> None:
        super().__init__(name="p28-wake", daemon=True)
        self.store = store
        self.url = url
        self.timeout_s = timeout_s
        self.stopped = threading.Event()
        self.connected = False
        self.last_push = 0.0  # time.monotonic() of the last push, 0 before the first
        self.resyncs = 0
        self.conn: Any = None

    def run(self) -> None:
        pause = RECONNECT_FIRST_S
        while not self.stopped.is_set():
            try:
                self.conn = self.connect()
                self.connected = True
                log.warning("observer_tasks: wake listener connected")
                pause = RECONNECT_FIRST_S
                self.resync()
                self.listen(self.conn)
            except (redis.RedisError, OSError, Unavailable) as exc:
                if not self.stopped.is_set() and (self.connected or pause == RECONNECT_FIRST_S):
                    log.warning("P2.8A.3: wake listener lost Redis (%r); polls cover until it is back", exc)
            except Exception:
                # A bug, not an outage: end the thread; the sweeper's heartbeat starts a new listener.
                log.exception("P2.8A.3: wake listener failed")
                return
            finally:
                self.connected = False
                if self.conn is not None:
                    self.conn.disconnect()
            self.stopped.wait(pause)
            pause = min(pause * 2, RECONNECT_MAX_S)

    def connect(self) -> Any:
        """A dedicated RESP2 connection receiving its own tracking invalidations for the heat prefix."""
        pool = redis.ConnectionPool.from_url(self.url, protocol=2, socket_timeout=self.timeout_s,
                                             socket_connect_timeout=self.timeout_s, client_name="observer_tasks:wake")
        conn = pool.make_connection()
        conn.connect()
        conn.send_command("CLIENT", "ID")
        client_id = conn.read_response()
        conn.send_command("CLIENT", "TRACKING", "ON", "REDIRECT", client_id, "BCAST", "PREFIX",
                          self.store.keys.heat_prefix)
        conn.read_response()
        conn.send_command("SUBSCRIBE", "__redis__:invalidate")
        conn.read_response()
        return conn

    def listen(self, conn: Any) -> None:
        while not self.stopped.is_set():
            if not conn.can_read(timeout=READ_WAIT_S):
                continue
            plans: dict[str, None] = {}  # ordered, de-duplicated
            flushed = False
            while len(plans) < BATCH_MAX and conn.can_read(timeout=0):
                message = conn.read_response()
                if not isinstance(message, list) or len(message) != 3 or message[0] != b"message":
                    continue
                if message[2] is None:  # FLUSHDB/FLUSHALL: every key was invalidated
                    flushed = True
                    continue
                if not isinstance(message[2], list):  # someone PUBLISHed to the channel: not from tracking
                    continue
                for key in message[2]:
                    plan = self.store.keys.plan_of_heat_key(key)
                    if plan is not None:
                        plans[plan] = None
            self.last_push = time.monotonic()
            if flushed:
                # Tracking spans the server: a FLUSHDB of any database lands here. Look again, uncounted:
                # the resync counter (and its alerts) is about this listener's connection.
                self.resync(counted=False)
            self.wake(list(plans))

    def wake(self, plans: list[str]) -> None:
        try:
            self.store.wake(plans)
        except Unavailable as exc:
            # The chain's polls record these plans; nothing is lost, only later.
            log.warning("P2.8A.3: wake step failed for %d plan(s) (%s)", len(plans), exc)

    def resync(self, counted: bool = True) -> None:
        """One wake step over every plan under observation (in batches): heat written while away."""
        plans = self.store.leased_plans()
        for i in range(0, len(plans), BATCH_MAX):
            self.wake(plans[i:i + BATCH_MAX])
        if counted:
            self.resyncs += 1
            self.store.add_counts({"wake_resyncs": 1})

    def state(self) -> dict[str, Any]:
        age = time.monotonic() - self.last_push if self.last_push else None
        return {"wake": "connected" if self.connected and self.is_alive() else "reconnecting",
                "last_push_age_ms": None if age is None else int(age * 1000), "resyncs": self.resyncs}

    def stop(self) -> None:
        """The loop notices within READ_WAIT_S and closes its own connection."""
        self.stopped.set()
