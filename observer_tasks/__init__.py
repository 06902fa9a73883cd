"""observer_tasks: the late heat observer on Celery.

The apply layer calls ``observe`` (early, synchronous) and ``observe_late`` (admission + first message on
queue ``late_obs``); neither ever raises. ``celery -A observer_tasks worker -Q late_obs`` finds the Celery
app here. The package is laid out by role: ``core`` (settings, keys, the Redis steps, the app, shared by
all), ``client`` (the apply layer's side), ``worker`` (the tasks and the worker's services, loaded by the
worker alone) and ``ops`` (the operator's tools, on top).
"""

from .client.producer import observe, observe_late
from .core.app import app

__all__ = ["app", "observe", "observe_late"]
