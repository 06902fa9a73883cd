"""Worker signals: settings refusal, the start-up lines, the /metrics server, the sweeper.

All of it runs in the worker's main process: the metrics server and the
sweeper start when the worker is ready, so pool processes never run them.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery import signals

from . import kombu_fixes
from .metrics import serve
from .settings import Settings, SettingsError
from .store import redis_client
from .sweeper import Sweeper

log = logging.getLogger("observer_tasks.worker")

#: Socket timeout of the main process's Redis client (metrics, sweeper), seconds.
MAIN_TIMEOUT_S = 2.0

_running: dict[str, Any] = {}
kombu_fixes.install()


@signals.celeryd_init.connect
def refuse_bad_settings(sender: Any = None, conf: Any = None, options: Any = None, **_: Any) -> None:
    """Stop the worker before it starts when a variable holds a bad value: one line, no traceback."""
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"P2.8A.3: refusing to start: {exc}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        raise SystemExit(2) from None
    _running["settings"] = settings
    # The worker only ever sends late_poll messages (reschedules): no task-sent event for those.
    if conf is not None:
        conf.task_send_sent_event = False


@signals.celeryd_after_setup.connect
def log_startup(sender: Any = None, instance: Any = None, **_: Any) -> None:
    settings = _running.get("settings") or Settings.from_env()
    concurrency = getattr(instance, "concurrency", None) or settings.late_obs_max_workers
    # Logged at WARNING: Celery's default worker log level, where operators grep for them.
    for line in settings.startup_lines(workers=concurrency):
        log.warning(line)
    log.warning("P2.8A.3: Late observer pool created (max_workers=%s)", concurrency)


@signals.worker_ready.connect
def start_main_process_services(sender: Any = None, **_: Any) -> None:
    from .tasks import worker_store

    settings, store = worker_store()
    main_store = type(store)(settings, redis_client(settings.redis_url, MAIN_TIMEOUT_S))
    if settings.metrics_port:
        try:
            _running["metrics"] = serve(settings, main_store.client)
            log.warning("P2.8A.3: metrics on http://%s:%s/metrics", settings.metrics_addr, settings.metrics_port)
        except OSError as exc:
            log.error("P2.8A.3: cannot serve metrics on %s:%s: %s", settings.metrics_addr, settings.metrics_port, exc)
    sweeper = Sweeper(main_store)
    sweeper.start()
    _running["sweeper"] = sweeper


@signals.worker_shutdown.connect
def stop_main_process_services(**_: Any) -> None:
    sweeper = _running.pop("sweeper", None)
    if sweeper:
        sweeper.stopped.set()
    metrics = _running.pop("metrics", None)
    if metrics:
        server, _thread = metrics
        server.shutdown()
