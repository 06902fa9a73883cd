"""The observer's Celery app, shared by the apply layer (which sends) and the worker (which runs the tasks).

A guest in the apply layer's process: the app is never made the process's current or default app
(``set_as_current=False``), so an apply layer with its own Celery app and ``@shared_task`` keeps them
after ``import observer_tasks``; ``celery worker`` makes it current in the worker process itself. Its
settings come from its own module, ``observer_tasks.core.celeryconfig`` (the repository's top-level
``celeryconfig.py``, linked into the package), never from whatever ``celeryconfig`` is first on
``sys.path``.

The task bodies live in worker/tasks.py, which only the worker imports (``include``); the worker's services
are bootsteps named by strings, so importing this module loads nothing of the worker.
"""

from __future__ import annotations

from celery import Celery

#: The app's Celery settings module (a link to the top-level celeryconfig.py, so it is installed with the
#: package and cannot shadow, or be shadowed by, another program's ``celeryconfig``).
CONFIG_MODULE = "observer_tasks.core.celeryconfig"

app = Celery("observer_tasks", include=["observer_tasks.worker.tasks"], set_as_current=False)
app.config_from_object(CONFIG_MODULE)
#: The worker's services (worker/services.py), named, not imported: only `celery worker` loads them; the steps
#: they require (settings, final states, wake) follow by their ``requires``.
WORKER_STEPS = ("MetricsStep", "SweeperStep", "HeartbeatStep")
for step in WORKER_STEPS:
    app.steps["worker"].add(f"observer_tasks.worker.services:{step}")
