"""A Redis broker transport with one guard around a kombu 5.7 bug that kills a worker when Redis restarts.

The upstream bug: when the broker connection is lost with unacknowledged messages in hand (with countdown
tasks there always are), Celery closes the connection; kombu's Redis ``Channel`` then tries to requeue those
messages through ``Channel._connparams`` after the transport has already dropped its client, and fails with
``AttributeError: 'NoneType' object has no attribute 'hostname'`` instead of a connection error. Celery
treats that as unrecoverable and the worker exits. The guard raises the connection error kombu expects there,
so Celery reconnects as for any broker outage; the messages stay in the unacked hash and come back after the
visibility timeout (and the sweeper covers their plans in any case).

Scope: only the worker uses it, and only with a ``redis://`` broker (``Transport`` below) or a
``redis+sentinel://`` one (``SentinelTransport``: a killed master is the same restart): the worker's start-up
step names it in ``broker_transport``. Nothing is patched: it is a subclass. If kombu's internals are
not what the guard was written against (tested: kombu 5.7), ``applicable()`` says why and the worker logs one
line and keeps kombu's own transport.
"""

from __future__ import annotations

import inspect
from typing import Any

import kombu
import redis
from kombu.transport import redis as kombu_redis

TESTED_KOMBU = (5, 7)
TRANSPORT = "observer_tasks.worker.kombu_guard:Transport"
SENTINEL_TRANSPORT = "observer_tasks.worker.kombu_guard:SentinelTransport"


def applicable() -> str | None:
    """None when the guard fits this kombu; otherwise why it stays out (one line)."""
    version = tuple(int(part) for part in kombu.__version__.split(".")[:2])
    if version != TESTED_KOMBU:
        return f"kombu {kombu.__version__} is not the tested {TESTED_KOMBU[0]}.{TESTED_KOMBU[1]}"
    method = getattr(kombu_redis.Channel, "_connparams", None)
    if method is None or list(inspect.signature(method).parameters) != ["self", "asynchronous"]:
        return "kombu.transport.redis.Channel._connparams is not the method the guard expects"
    return None


def _guarded_connparams(self: Any, asynchronous: bool = False) -> Any:
    if self.connection is None or self.connection.client is None:
        raise redis.ConnectionError("broker connection already closed")
    return kombu_redis.Channel._connparams(self, asynchronous=asynchronous)


class Channel(kombu_redis.Channel):
    _connparams = _guarded_connparams


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(kombu_redis.SentinelChannel):
    _connparams = _guarded_connparams


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel
