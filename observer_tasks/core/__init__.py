"""The shared core: settings, Redis keys, heat reading, the Redis steps and their scripts, the Celery app and
its messages. Every role imports from here; nothing here imports a role."""
