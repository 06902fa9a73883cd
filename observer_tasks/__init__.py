"""observer_tasks: the late heat observer on Celery.

The apply layer calls ``observe`` (early, synchronous) and ``observe_late``
(admission + first message on queue ``late_obs``); neither ever raises.
``celery -A observer_tasks worker -Q late_obs`` finds the Celery app here; the worker's
services are a bootstep (services.py) that only the worker loads.
"""

from .producer import observe, observe_late
from .tasks import app

celery = app
__all__ = ["app", "celery", "observe", "observe_late"]
