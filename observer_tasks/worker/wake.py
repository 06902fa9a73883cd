"""The wake listener: Redis pushes every write under the heat prefix, and the wake step records the plan.

One connection per worker, named ``observer_tasks:wake``, speaking RESP2: it turns on client tracking in
broadcast mode for the heat prefix with REDIRECT to itself, then subscribes to ``__redis__:invalidate``
(Redis >= 6, no server configuration; keyspace notifications would need CONFIG SET). Every write to a heat
hash then arrives as one invalidation message, within a millisecond or two. The listener drains whatever is
readable, keeps the keys that name a valid plan id, and runs the wake step for the batch: one atomic Redis
call (wake.lua) that records each plan still leased whose hash is readable. Writes to other
keys, other databases, or plans not under observation change nothing there.

Nothing depends on the push for correctness: the countdown chain keeps looking (at the safety interval
while every live worker's listener is connected, at POLL_MS otherwise), and after every (re)connect the
listener resyncs: one wake step over every leased plan, so heat written while it was away is recorded at
once. With several workers every listener sees every push; the lease lets exactly one record.

Tracking state lives on the server the connection is on: it does not move to a new master. So the listener
treats as lost (and reconnects through the connection factory, which asks Sentinel for the master, then
turns tracking on again and resyncs): any error reply (READONLY, UNBLOCKED: its server was demoted), a closed
connection (Sentinel's CLIENT KILL, a killed server), a master address change that Sentinel reports (checked
every WAKE_PING_S), and a silent connection: after WAKE_PING_S without a byte it sends PING, and a connection
that has not answered WAKE_SILENT_S later (a firewall or NAT that dropped it without a reset) is dropped.
While it is lost the heartbeat reports it, so the chains poll at POLL_MS.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
import redis.sentinel

from ..core import contract as C
from ..core.connections import AccessRefused, Unavailable, describe, follow_master, master_address, redis_client
from ..core.inputs import plan_of_heat_key
from ..core.ledger import Ledger, Recorded
from ..core.timings import (
    WAKE_BATCH,
    WAKE_PING_S,
    WAKE_READ_S,
    WAKE_RECONNECT_MAX_S,
    WAKE_RECONNECT_S,
    WAKE_SILENT_S,
)

log = logging.getLogger("observer_tasks.wake")


class WakeListener(threading.Thread):
    """Runs until ``stopped`` is set; reconnects (and resyncs) after any connection loss."""

    def __init__(self, ledger: Ledger, url: str, timeout_s: float,
                 on_recorded: Callable[[dict[str, Recorded], str], None] | None = None) -> None:
        super().__init__(name="p28-wake", daemon=True)
        self.ledger = ledger
        self.url = url
        self.timeout_s = timeout_s
        self.stopped = threading.Event()
        self.connected = False
        self.last_push = 0.0  # time.monotonic() of the last push, 0 before the first
        self.resyncs = 0
        self.conn: Any = None
        self.pool: Any = None
        self.master = ""  # host:port the current connection's tracking is on
        self.resync_due = False  # a wake step failed for a passing reason: resync at the next turn
        #: Called with the outcomes of the plans each wake step recorded (their final state in Flower).
        self.on_recorded = on_recorded

    def run(self) -> None:
        pause = WAKE_RECONNECT_S
        while not self.stopped.is_set():
            try:
                self.conn = self.connect()
                self.connected = True
                log.warning("observer_tasks: wake listener connected")
                pause = WAKE_RECONNECT_S
                self.resync()
                self.listen(self.conn)
            except (redis.RedisError, OSError, Unavailable, AccessRefused) as exc:
                if not self.stopped.is_set() and (self.connected or pause == WAKE_RECONNECT_S):
                    log.warning("P2.8A.3: wake listener lost Redis (%r); polls cover until it is back", exc)
            except Exception:
                # A bug, not an outage: end the thread; the heartbeat step starts a new listener.
                log.exception("P2.8A.3: wake listener failed")
                return
            finally:
                self.connected = False
                if self.conn is not None:
                    self.conn.disconnect()
            self.stopped.wait(pause)
            pause = min(pause * 2, WAKE_RECONNECT_MAX_S)

    def connect(self) -> Any:
        """A dedicated RESP2 connection receiving its own tracking invalidations for the heat prefix."""
        client = redis_client(self.url, self.timeout_s, "wake", self.ledger.settings, protocol=2)
        self.pool = client.connection_pool
        conn = self.pool.make_connection()
        conn.connect()  # through Sentinel: the master it names now
        self.master = f"{conn.host}:{conn.port}"
        conn.send_command("CLIENT", "ID")
        client_id = conn.read_response()
        conn.send_command("CLIENT", "TRACKING", "ON", "REDIRECT", client_id, "BCAST", "PREFIX",
                          self.ledger.settings.heat_lookup_prefix)
        conn.read_response()
        conn.send_command("SUBSCRIBE", "__redis__:invalidate")
        conn.read_response()
        return conn

    def listen(self, conn: Any) -> None:
        heard = checked = time.monotonic()  # the last byte read; the last liveness check
        pinged = 0.0  # when an unanswered PING was sent, 0 when none is
        while not self.stopped.is_set():
            if not conn.can_read(timeout=WAKE_READ_S):
                if self.resync_due:
                    self.resync(counted=False)
                now = time.monotonic()
                if pinged and now - pinged > WAKE_SILENT_S:
                    raise redis.ConnectionError(f"wake connection silent for {now - heard:.1f}s (no PONG)")
                if now - checked >= WAKE_PING_S:
                    checked = now
                    self.check_master()
                    if not pinged and now - heard >= WAKE_PING_S:
                        conn.send_command("PING")  # allowed while subscribed; answered as a message
                        pinged = now
                continue
            heard, pinged = time.monotonic(), 0.0
            plans: dict[str, None] = {}  # ordered, de-duplicated
            flushed = False
            while len(plans) < WAKE_BATCH and conn.can_read(timeout=0):
                # An error reply (READONLY, UNBLOCKED ...) raises here: the server is no longer a master.
                message = conn.read_response()
                if not isinstance(message, list) or len(message) != 3 or message[0] != b"message":
                    continue
                if message[2] is None:  # FLUSHDB/FLUSHALL: every key was invalidated
                    flushed = True
                    continue
                if not isinstance(message[2], list):  # someone PUBLISHed to the channel: not from tracking
                    continue
                for key in message[2]:
                    plan = plan_of_heat_key(key, self.ledger.settings.heat_lookup_prefix)
                    if plan is not None:
                        plans[plan] = None
            self.last_push = time.monotonic()
            if flushed:
                # Tracking spans the server: a FLUSHDB of any database lands here. Look again, uncounted:
                # the resync counter (and its alerts) is about this listener's connection.
                self.resync(counted=False)
            self.wake(list(plans))

    def check_master(self) -> None:
        """Raise when Sentinel names another master than the one this connection's tracking is on."""
        if not isinstance(self.pool, redis.sentinel.SentinelConnectionPool):
            return
        # The wake step's own client too: on a demoted master it would find no lease and record nothing.
        follow_master(self.ledger.client)
        try:
            now_on = master_address(self.pool, fresh=True)
        except redis.RedisError:
            return  # sentinels unreachable: nothing known to have moved; PING still watches the connection
        if now_on != self.master:
            raise redis.ConnectionError(f"master moved from {self.master} to {now_on}")

    def wake(self, plans: list[str]) -> None:
        try:
            woken = self.ledger.wake(plans)
        except (Unavailable, AccessRefused, redis.ResponseError) as exc:
            # Nothing was written. Redis busy or away: look at every leased plan again soon (the chains' looks
            # and the sweeper would record these plans too, only later).
            log.warning("P2.8A.3: wake step failed for %d plan(s) (%s)", len(plans), describe(exc))
            self.resync_due = isinstance(exc, Unavailable)
            return
        if woken.recorded and self.on_recorded is not None:
            self.on_recorded(woken.recorded, "wake")
        if woken.skipped:
            plan, error = next(iter(woken.skipped.items()))
            log.warning("P2.8A.3: wake step could not record %d plan(s), their leases kept (%s: %s)",
                        len(woken.skipped), plan, error)

    def resync(self, counted: bool = True) -> None:
        """One wake step over every plan under observation (in batches): heat written while away."""
        self.resync_due = False
        plans = self.ledger.leased_plans()
        for i in range(0, len(plans), WAKE_BATCH):
            self.wake(plans[i:i + WAKE_BATCH])
        if counted:
            self.resyncs += 1
            self.ledger.count({C.WAKE_RESYNCS: 1})

    def state(self) -> dict[str, Any]:
        age = time.monotonic() - self.last_push if self.last_push else None
        return {"wake": "connected" if self.connected and self.is_alive() else "reconnecting",
                "last_push_age_ms": None if age is None else int(age * 1000), "resyncs": self.resyncs,
                "wake_master": self.master if self.connected else None}

    def stop(self) -> None:
        """The loop notices within WAKE_READ_S and closes its own connection."""
        self.stopped.set()
