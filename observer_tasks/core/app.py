"""The observer's Celery app, shared by the apply layer (which sends) and the worker (which runs the tasks).

The task bodies live in worker/tasks.py, which only the worker imports (``include``); the worker's services
are a bootstep named by a string, so importing this module loads nothing of the worker.
"""

from __future__ import annotations

from celery import Celery

app = Celery("observer_tasks", include=["observer_tasks.worker.tasks"])
app.config_from_object("celeryconfig")
# The worker's services, named (not imported): only `celery worker` loads them.
app.steps["worker"].add("observer_tasks.worker.services:ObserverServices")
