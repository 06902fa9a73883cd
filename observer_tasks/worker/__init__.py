"""What `celery worker` loads: the late tasks and the worker's services (a bootstep), never the apply layer."""
