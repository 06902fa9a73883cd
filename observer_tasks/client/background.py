"""The apply process's one background thread: it runs the outbox (held calls, counts, notes, rechecks) and the
sender (first messages), reports the process's limits for `observer-tasks status`, and flushes all of it at exit.

It starts with the first call that needs it and belongs to the process that made it (``pid``): after ``fork()``
the child builds its own (producer.py).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from ..core.app import app
from ..core.connections import describe, follow_master, redis_client
from ..core.ledger import Ledger
from ..core.settings import Settings
from ..core.timings import (
    CALL_TIMEOUT_S,
    EXIT_FLUSH_S,
    OUTBOX_TIMEOUT_S,
    PRODUCER_REPORT_S,
    PUBLISH_TIMEOUT_S,
    WAKE_HEALTH_READ_S,
)
from .outbox import Outbox, trace
from .resilience import Breaker, ThrottledLog
from .sender import Sender

log = logging.getLogger("observer_tasks")


class Background:
    """The outbox, the sender, and the thread that runs them."""

    def __init__(self, settings: Settings, broker_breaker: Breaker, callers: Any = None) -> None:
        self.settings, self.pid = settings, os.getpid()
        self.cond = threading.Condition(threading.Lock())
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.reported_at = -PRODUCER_REPORT_S
        self.problems = ThrottledLog()
        self._health: Any = None
        self.sender = Sender(app, settings, self.connect, self.health_client, self.note, broker_breaker)
        outbox_client = redis_client(settings.redis_url, OUTBOX_TIMEOUT_S, "outbox", settings)
        self.outbox = Outbox(Ledger(settings, outbox_client), self.sender.submit, self.wake)
        self.outbox.recorded = self.sender.submit_recorded
        # With Sentinel: the Redis clients whose idle connections must leave a master the sentinels no longer name.
        self.followed = [outbox_client, *([callers] if callers is not None else [])]
        self.followed_at = -WAKE_HEALTH_READ_S
        #: The master each followed client used when it was last confirmed: a client's pool also learns a new
        #: master on its own (a new connection asks the sentinels), so a change is found against this, not it.
        self.masters: list[Any] = [None] * len(self.followed)

    def note(self, plan_ids: list[str], cause: str) -> None:
        self.outbox.note(plan_ids, cause)

    def health_client(self) -> Any:
        """The sender's client for the wake path's health: the callers' short timeout (thread only)."""
        if self._health is None:
            self._health = redis_client(self.settings.redis_url, CALL_TIMEOUT_S, "producer", self.settings)
        return self._health

    def connect(self) -> Any:
        """The sender's broker connection: its own, short timeouts, no retries (the worker's connection settings,
        with long BRPOP reads, would stall it)."""
        url, sentinel_options, ssl = self.settings.celery_broker()
        if sentinel_options:
            sentinel_options["sentinel_kwargs"].update(socket_timeout=PUBLISH_TIMEOUT_S,
                                                       socket_connect_timeout=PUBLISH_TIMEOUT_S)
        return app.connection_for_write(
            url, connect_timeout=PUBLISH_TIMEOUT_S, ssl=ssl,
            transport_options={**app.conf.broker_transport_options, **sentinel_options,
                               "socket_timeout": PUBLISH_TIMEOUT_S, "socket_connect_timeout": PUBLISH_TIMEOUT_S,
                               "read_timeout": PUBLISH_TIMEOUT_S, "write_timeout": PUBLISH_TIMEOUT_S,
                               "max_retries": 0})

    def wake(self) -> None:
        with self.cond:
            if self.thread is None and not self.stopping:
                self.thread = threading.Thread(target=self.run, name="p28-outbox", daemon=True)
                self.thread.start()
            self.cond.notify()

    def run(self) -> None:
        while True:
            with self.cond:
                if self.stopping:
                    return
            try:
                self.work_once()
            except Exception:  # a bug here must not kill the thread: the sweeper covers the plans
                self.problems.warning("unexpected error in the outbox thread", exc_info=True)
            with self.cond:
                dues = [d for d in (self.outbox.due(), self.sender.due()) if d is not None]
                wait = max(0.0, min(dues) - time.monotonic()) if dues else PRODUCER_REPORT_S
                if not self.stopping:
                    self.cond.wait(min(wait, PRODUCER_REPORT_S))

    def work_once(self, stopping: bool = False) -> None:
        self.follow_master()
        self.outbox.run_once()
        if self.settings.replica_wait_ms:
            self.outbox.replica_wait()
        self.sender.run_once(stopping)
        if time.monotonic() >= self.reported_at + PRODUCER_REPORT_S:
            self.reported_at = time.monotonic()
            self.report()

    def follow_master(self) -> None:
        """Ask the sentinels for the master (at most every WAKE_HEALTH_READ_S, and before making held calls): after
        a failover whose old master lived on (a BUSY spell past Sentinel's down-after, a SENTINEL FAILOVER), a
        pooled connection there would take the held calls and lose them when it is demoted."""
        now = time.monotonic()
        if self.settings.redis_url.split("://", 1)[0].endswith("+sentinel") and (
                now >= self.followed_at + WAKE_HEALTH_READ_S or self.outbox.failure_began is not None):
            self.followed_at = now
            confirmed = self.outbox.master_confirmed_at
            answered = True
            for i, client in enumerate(self.followed):
                answered = follow_master(client) and answered
                master = getattr(client.connection_pool, "master_address", None)
                if self.masters[i] is not None and master != self.masters[i]:
                    trace.debug("client %d: master %s -> %s, last confirmed at %s", i, self.masters[i], master,
                                confirmed)
                    # A failover: what the old master took since it was last confirmed may be gone (not
                    # replicated in time, or taken while it was demoted): recheck from then on.
                    self.outbox.suspect(now if confirmed is None else confirmed)
                self.masters[i] = master
            if answered:
                self.outbox.master_confirmed_at = now

    def report(self) -> None:
        """This process's limits and state, for `observer-tasks status` (best effort)."""
        s = self.settings
        state = {"host": socket.gethostname(), "pid": os.getpid(), "max_inflight": s.late_obs_max_inflight,
                 "max_wait_ms": s.late_obs_max_wait_ms, "poll_ms": s.late_obs_poll_ms,
                 "safety_poll_ms": s.safety_poll_ms, "late": s.late_obs_enabled, "early": s.heat_obs_enabled,
                 "points": list(s.early_points), "held_calls": len(self.outbox.calls)}
        try:
            self.outbox.ledger.report(f"{state['host']}:{state['pid']}", state)
        except Exception as exc:  # status loses a line, nothing else
            log.debug("P2.8A observer: cannot report limits (%s)", describe(exc))

    def close(self, timeout: float = EXIT_FLUSH_S) -> None:
        """Make the held calls, send the queued messages and pay the counts, then stop: at most ``timeout`` s.
        What is left is given up (counted, when Redis answers) or left to the sweeper (noted)."""
        if os.getpid() != self.pid:
            return  # an inherited copy: its thread and connections are the parent's
        deadline = time.monotonic() + timeout
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
            thread = self.thread
        if thread is not None and thread.is_alive():
            thread.join(max(0.0, deadline - time.monotonic()))
        while (self.outbox.calls or self.sender.queue) and time.monotonic() < deadline:
            self.work_once(stopping=True)
            if self.outbox.failing_since is not None:
                break
        unsent, given_up = self.sender.give_up(), self.outbox.refuse_held("given_up")
        if unsent:
            self.outbox.note(unsent, "process exited before the message was sent")
            log.warning("P2.8A observer: %d late message(s) not sent before exit; the sweeper will record them",
                        len(unsent))
        try:
            self.outbox.pay()
        except Exception as exc:
            if given_up:
                log.warning("P2.8A observer: %d call(s) held through a Redis outage given up at exit and not counted "
                            "(Redis unreachable: %s)", given_up, describe(exc))
        else:
            if given_up:
                log.warning("P2.8A observer: %d call(s) held through a Redis outage given up at exit (counted as "
                            "p28_observe_refused_total{cause=\"given_up\"})", given_up)
        self.sender.drop_connection()
        self.outbox.ledger.client.close()
