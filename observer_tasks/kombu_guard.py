"""One guard around a kombu 5.7 bug that kills a worker when Redis restarts.

When the broker connection is lost with unacknowledged messages in hand (with
countdown tasks there always are), Celery closes the connection; kombu's Redis
channel then tries to requeue those messages through a transport whose client
it has already dropped, and fails with AttributeError ('NoneType' object has no
attribute 'hostname') instead of a connection error. Celery treats that as
unrecoverable and the worker exits. Raising the connection error that kombu
expects there lets Celery reconnect as it does for any broker outage; the
messages stay in the unacked hash and come back after the visibility timeout
(and the sweeper covers their plans in any case).
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import redis as kombu_redis

_connparams = kombu_redis.Channel._connparams


def _guarded_connparams(self: Any, asynchronous: bool = False) -> Any:
    if self.connection is None or self.connection.client is None:
        raise redis.ConnectionError("broker connection already closed")
    return _connparams(self, asynchronous=asynchronous)


def install() -> None:
    kombu_redis.Channel._connparams = _guarded_connparams  # type: ignore[method-assign]
