"""The worker's services: Celery bootsteps, one concern each, loaded by ``celery worker`` alone.

core/app.py names them (strings) in the worker blueprint, so importing the API loads nothing of them. Each step
builds what it owns when the worker is created, starts it with the worker and stops it with the worker, and
attaches it to the worker (``worker.observer_<name>``); what the task threads need is the WorkerContext the
settings step attaches to the app (context.py). No module-level state.

    Settings ── Metrics                  /metrics
        └──── FinalStates ── Wake ── Heartbeat    Flower's final states; the wake listener; heartbeat + gaps
                        └──── Sweeper             the ledger's sweeper
"""

from __future__ import annotations

import logging
import sys
from typing import Any
from urllib.parse import urlsplit

from celery import bootsteps

from ..core.access import access_problem
from ..core.connections import redis_client
from ..core.ledger import Ledger
from ..core.settings import Settings, SettingsError
from ..core.timings import MAIN_TIMEOUT_S, SCRAPE_REDIS_TIMEOUT_S
from . import kombu_guard
from .context import WorkerContext
from .heartbeat import Heartbeat
from .metrics import serve
from .sweeper import Sweeper
from .task_states import FinalStates
from .wake import WakeListener

log = logging.getLogger("observer_tasks.worker")


def refuse(why: str) -> None:
    print(f"P2.8A.3: refusing to start: {why}", file=sys.stderr, flush=True)
    raise SystemExit(2)


class SettingsStep(bootsteps.Step):
    """The gate: refuses bad settings or a refused Redis user (exit 2, one line), logs the operators' start-up
    lines, names the guarded Redis transport, and attaches the WorkerContext (settings read once)."""

    label = "observer_tasks settings"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        try:
            settings = Settings.from_env()
        except SettingsError as exc:
            refuse(str(exc))
        refused = access_problem(settings, MAIN_TIMEOUT_S)
        if refused:
            refuse(refused)
        app = worker.app
        app.conf.task_send_sent_event = False  # the worker only sends late_poll reschedules: no task-sent for those
        guarded = {"redis": kombu_guard.TRANSPORT, "redis+sentinel": kombu_guard.SENTINEL_TRANSPORT}
        transport = guarded.get(urlsplit(settings.broker).scheme)
        if transport and settings.kombu_guard:
            why_not = kombu_guard.applicable()
            if why_not:
                log.warning("P2.8A.3: kombu guard off: %s", why_not)
            else:
                kombu_guard.install(app, transport)
        concurrency = getattr(worker, "concurrency", None) or settings.late_obs_max_workers
        for line in settings.startup_lines(workers=concurrency):  # WARNING: Celery's default level
            log.warning(line)
        log.warning("P2.8A.3: Late observer pool created (max_workers=%s)", concurrency)
        log.warning(settings.wake_line())
        worker.observer_context = app.observer_worker = WorkerContext(settings)


class MetricsStep(bootsteps.StartStopStep):
    """/metrics on P28_METRICS_PORT (0: none), read from Redis at scrape time."""

    label = "observer_tasks metrics"
    requires = (SettingsStep,)

    def start(self, worker: Any) -> None:
        s = worker.observer_context.settings
        worker.observer_metrics = None
        if s.metrics_port:
            try:
                client = redis_client(s.redis_url, SCRAPE_REDIS_TIMEOUT_S, "metrics", s)
                worker.observer_context.clients.append(client)
                worker.observer_metrics = serve(s, client)
                log.warning("observer_tasks: /metrics served on http://%s:%s/metrics", s.metrics_addr, s.metrics_port)
            except OSError as exc:
                log.error("P2.8A.3: cannot serve metrics on %s:%s: %s", s.metrics_addr, s.metrics_port, exc)

    def stop(self, worker: Any) -> None:
        if getattr(worker, "observer_metrics", None) is not None:
            worker.observer_metrics[0].shutdown()
            worker.observer_metrics = None

    shutdown = stop


class FinalStatesStep(bootsteps.StartStopStep):
    """The thread that sends the final state (Flower's SUCCESS) of plans the wake step and the sweeper decide."""

    label = "observer_tasks final states"
    requires = (SettingsStep,)

    def start(self, worker: Any) -> None:
        ctx = worker.observer_context
        ctx.final_states = worker.observer_final_states = FinalStates(worker.app, worker.hostname, ctx.decided)
        ctx.final_states.start()

    def stop(self, worker: Any) -> None:
        states = getattr(worker, "observer_final_states", None)
        if states is not None:
            states.stop()
            states.join(2)
            worker.observer_final_states = None

    shutdown = stop


class WakeStep(bootsteps.StartStopStep):
    """The wake listener (with P28_LATE_OBS_WAKE): records a plan the moment its heat hash is written."""

    label = "observer_tasks wake"
    requires = (FinalStatesStep,)

    def start(self, worker: Any) -> None:
        worker.observer_wake = self
        self.worker, self.listener = worker, None
        s = worker.observer_context.settings
        if s.late_obs_enabled and s.late_obs_wake:
            self.listener = self.new_listener()
            self.listener.start()

    def new_listener(self) -> WakeListener:
        ctx = self.worker.observer_context
        s = ctx.settings
        return WakeListener(Ledger(s, redis_client(s.redis_url, MAIN_TIMEOUT_S, "wake_step", s)), s.redis_url,
                            MAIN_TIMEOUT_S, ctx.final_states.decided)

    def state(self) -> dict[str, Any]:
        """The listener's state for the heartbeat; a listener whose thread died (a bug) is replaced first."""
        listener = self.listener
        if listener is None:
            return {"wake": "off", "last_push_age_ms": None, "resyncs": 0}
        if not listener.is_alive() and not listener.stopped.is_set():
            log.error("P2.8A.3: wake listener thread died; starting a new one")
            self.listener = self.new_listener()
            self.listener.resyncs = listener.resyncs
            self.listener.start()
            return {**self.listener.state(), "wake": "reconnecting"}
        return listener.state()

    def stop(self, worker: Any) -> None:
        if getattr(self, "listener", None) is not None:
            self.listener.stop()
            self.listener = None

    shutdown = stop


class SweeperStep(bootsteps.StartStopStep):
    """The ledger's sweeper: decides every plan nobody recorded by deadline + grace."""

    label = "observer_tasks sweeper"
    requires = (FinalStatesStep,)

    def start(self, worker: Any) -> None:
        ctx = worker.observer_context
        s = ctx.settings
        ledger = Ledger(s, redis_client(s.redis_url, MAIN_TIMEOUT_S, "sweeper", s))
        ctx.clients.append(ledger.client)
        worker.observer_sweeper = Sweeper(ledger, ctx.gaps, ctx.final_states.decided)
        worker.observer_sweeper.start()

    def stop(self, worker: Any) -> None:
        sweeper = getattr(worker, "observer_sweeper", None)
        if sweeper is not None:
            sweeper.stopped.set()
            sweeper.join(5)
            worker.observer_sweeper = None

    shutdown = stop


class HeartbeatStep(bootsteps.StartStopStep):
    """The worker's heartbeat, the wake path's health and the Redis gaps it sees; supervises the listener."""

    label = "observer_tasks heartbeat"
    requires = (WakeStep,)

    def start(self, worker: Any) -> None:
        ctx = worker.observer_context
        s = ctx.settings
        ledger = Ledger(s, redis_client(s.redis_url, MAIN_TIMEOUT_S, "worker", s))
        limits = {"max_inflight": s.late_obs_max_inflight, "max_wait_ms": s.late_obs_max_wait_ms,
                  "poll_ms": s.late_obs_poll_ms, "safety_poll_ms": s.safety_poll_ms, "points": list(s.early_points),
                  "concurrency": getattr(worker, "concurrency", None) or s.late_obs_max_workers}
        worker.observer_heartbeat = Heartbeat(ledger, worker.hostname, ctx.gaps, worker.observer_wake.state, limits,
                                              ctx.clients)
        worker.observer_heartbeat.start()

    def stop(self, worker: Any) -> None:
        beat = getattr(worker, "observer_heartbeat", None)
        if beat is not None:
            beat.stopped.set()
            beat.join(5)
            worker.observer_heartbeat = None

    shutdown = stop
