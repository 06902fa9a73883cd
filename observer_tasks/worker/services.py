"""The worker's services, as one Celery bootstep loaded by ``celery worker`` alone.

tasks.py adds this step to the worker blueprint by name (a string), so importing the API loads nothing of
it: no signal handler, no transport, no thread. Created with the worker, the step refuses bad settings and a
Redis user that Redis refuses (exit code 2 and one line), logs the operators' start-up lines, names the guarded
Redis transport for the broker, and turns off task-sent events for the worker's own reschedules. Started with
the worker, it serves /metrics and runs the sweeper thread (heartbeat, sweeps, and the wake listener it
supervises) and the thread that sends the final state of the plans those two decide (task_states.py);
stopped with it, it stops them. Everything lives on the step instance: no module-level state.
"""

from __future__ import annotations

import logging
import sys
from typing import Any
from urllib.parse import urlsplit

from celery import bootsteps

from ..core.settings import Settings, SettingsError
from ..core.store import Store, access_problem, redis_client
from . import kombu_guard
from .metrics import serve
from .sweeper import Sweeper
from .task_states import FinalStates
from .wake import WakeListener

log = logging.getLogger("observer_tasks.worker")

#: Socket timeout of the main process's Redis clients (metrics, sweeper, wake step), seconds.
MAIN_TIMEOUT_S = 2.0


class ObserverServices(bootsteps.StartStopStep):
    """Settings refusal and start-up lines at creation; /metrics, sweeper and wake listener while running."""

    label = "observer_tasks"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        try:
            self.settings = Settings.from_env()
        except SettingsError as exc:
            print(f"P2.8A.3: refusing to start: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        # A refused user (wrong password, missing ACL permission) is a configuration error, like a bad setting:
        # waiting would not fix it. Redis that cannot be reached is an outage: the worker starts and waits.
        refused = access_problem(self.settings, MAIN_TIMEOUT_S)
        if refused:
            print(f"P2.8A.3: refusing to start: {refused}", file=sys.stderr, flush=True)
            raise SystemExit(2)
        app = worker.app
        # The worker only ever sends late_poll reschedules: no task-sent event for those.
        app.conf.task_send_sent_event = False
        guarded = {"redis": kombu_guard.TRANSPORT, "redis+sentinel": kombu_guard.SENTINEL_TRANSPORT}
        transport = guarded.get(urlsplit(self.settings.broker).scheme)
        if transport and self.settings.kombu_guard:
            why_not = kombu_guard.applicable()
            if why_not:
                log.warning("P2.8A.3: kombu guard off: %s", why_not)
            else:
                kombu_guard.install(app, transport)
        concurrency = getattr(worker, "concurrency", None) or self.settings.late_obs_max_workers
        # Logged at WARNING: Celery's default worker log level, where operators grep for them.
        for line in self.settings.startup_lines(workers=concurrency):
            log.warning(line)
        log.warning("P2.8A.3: Late observer pool created (max_workers=%s)", concurrency)
        log.warning(self.settings.wake_line())
        self.metrics: Any = None
        self.sweeper: Sweeper | None = None
        self.final_states: FinalStates | None = None

    def start(self, worker: Any) -> None:
        s = self.settings
        store = Store(s, redis_client(s.redis_url, MAIN_TIMEOUT_S, "worker", s))
        if s.metrics_port:
            try:
                self.metrics = serve(s, redis_client(s.redis_url, MAIN_TIMEOUT_S, "metrics", s))
                log.warning("observer_tasks: /metrics served on http://%s:%s/metrics", s.metrics_addr, s.metrics_port)
            except OSError as exc:
                log.error("P2.8A.3: cannot serve metrics on %s:%s: %s", s.metrics_addr, s.metrics_port, exc)
        # The plans the wake step and the sweeper decide get their final state in Flower from here.
        self.final_states = FinalStates(worker.app, worker.hostname)
        self.final_states.start()
        make_listener = None
        if s.late_obs_enabled and s.late_obs_wake:
            def make_listener() -> WakeListener:
                listener = WakeListener(Store(s, redis_client(s.redis_url, MAIN_TIMEOUT_S, "wake_step", s)),
                                        s.redis_url, MAIN_TIMEOUT_S)
                listener.on_recorded = self.final_states.decided
                return listener
        self.sweeper = Sweeper(store, worker.hostname, make_listener)
        self.sweeper.on_recorded = self.final_states.decided
        self.sweeper.start()

    def stop(self, worker: Any) -> None:
        if self.sweeper is not None:
            self.sweeper.stopped.set()
            self.sweeper.join(5)
            self.sweeper = None
        if self.final_states is not None:
            self.final_states.stop()
            self.final_states.join(2)
            self.final_states = None
        if self.metrics is not None:
            server, _thread = self.metrics
            server.shutdown()
            self.metrics = None

    shutdown = stop
