"""The worker's Redis broker transport: kombu 5.7's, guarded against three bugs that make a broker fault fatal.

What kombu does wrong (each reproduced in tests/test_broker_faults.py, with the guard and without):

1. **A closed connection's channel.** When the broker connection is lost with unacknowledged messages in hand
   (with countdown tasks there always are), Celery closes the connection; kombu's Redis ``Channel`` then tries
   to requeue those messages through ``Channel._connparams`` after the transport has already dropped its
   client, and fails with ``AttributeError: 'NoneType' object has no attribute 'hostname'``: not a connection
   error, so Celery calls it unrecoverable and the worker exits.
2. **Failover rotation drops the configured transport.** ``Connection.switch()``, which kombu calls to try the
   next alternate URL (each ``sentinel://`` of a Sentinel broker), re-parses that URL and takes its scheme as
   the transport, replacing the one the application configured (``broker_transport``). After one failover the
   worker runs on kombu's own ``SentinelTransport``, and the next failover meets bug 1 unguarded.
3. **Redis saying "not now" is fatal.** A reply of BUSY (a script past the 5 s limit), READONLY (the server
   turned replica; a blocked BRPOP gets UNBLOCKED), OOM (maxmemory reached), MASTERDOWN, NOREPLICAS, MISCONF
   or TRYAGAIN on kombu's own commands (the ack's ``ZREM`` on ``unacked_index``, the delivery's ``ZADD``, the
   connection's ``PING``, BRPOP) is a ``ResponseError``, which kombu counts as a channel error: Celery calls it
   unrecoverable and the worker exits (LOADING is already a connection error).

What the guard does: ``Channel._connparams`` raises a connection error once the transport dropped its client
(1); ``Connection`` keeps the guarded transport when ``switch()`` moves to an alternate of the same kind (2);
the channels' Redis connections turn those replies into ``Refused``, a ``ResponseError`` (so redis-py still
reads a pipeline's replies to the end) that the transports list among their connection errors, so Celery
reconnects as for any broker outage (3). A message BRPOP took whose unacknowledged record Redis refused (OOM:
the pop is allowed, the record is not) is handed to the worker anyway, rather than dropped (kombu raises and
loses it); if the worker dies before acknowledging it, the plan's lease is the record (the sweeper decides
it). Messages are otherwise kombu's: unacknowledged ones stay in the unacked hash and come back after the
visibility timeout. And the worker tries to reach its broker again every RECONNECT_S, not kombu's 2 s, 4 s, 6 s...
(celeryconfig.py lets it try for as long as an outage lasts).

Scope: only the worker uses it, with a ``redis://`` broker (``Transport``) or a ``redis+sentinel://`` one
(``SentinelTransport``): the worker's start-up step calls ``install()``. Nothing of kombu is patched: these are
subclasses, named through Celery's ``broker_transport`` setting and the app's ``amqp.Connection`` class. If
kombu's internals are not what the guard was written against (tested: kombu 5.7, redis-py 8.2),
``applicable()`` says why and the worker logs one line and keeps kombu's own transport. Upstream patches:
docs/reliability.md#the-worker-survives-its-brokers-faults.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import kombu
import redis
from kombu.transport import get_transport_cls, virtual
from kombu.transport import redis as kombu_redis
from redis import sentinel

log = logging.getLogger("observer_tasks.worker")

TESTED_KOMBU = (5, 7)
TRANSPORT = "observer_tasks.worker.kombu_guard:Transport"
SENTINEL_TRANSPORT = "observer_tasks.worker.kombu_guard:SentinelTransport"
#: Replies that say "not now" (the server is busy, loading, a replica, full, cut off from its master or its
#: replicas; UNBLOCKED: a blocked BRPOP ended because the server turned replica): a broker outage while they last.
REFUSALS = frozenset({"BUSY", "LOADING", "READONLY", "OOM", "MASTERDOWN", "NOREPLICAS", "MISCONF", "TRYAGAIN",
                      "UNBLOCKED"})


def applicable() -> str | None:
    """None when the guard fits this kombu; otherwise why it stays out (one line)."""
    version = tuple(int(part) for part in kombu.__version__.split(".")[:2])
    if version != TESTED_KOMBU:
        return f"kombu {kombu.__version__} is not the tested {TESTED_KOMBU[0]}.{TESTED_KOMBU[1]}"
    expected = {
        "kombu.transport.redis.Channel._connparams": (getattr(kombu_redis.Channel, "_connparams", None),
                                                      ["self", "asynchronous"]),
        "kombu.transport.redis.QoS.append": (getattr(kombu_redis.QoS, "append", None),
                                             ["self", "message", "delivery_tag"]),
        "kombu.Connection.switch": (getattr(kombu.Connection, "switch", None), ["self", "conn_str"]),
    }
    for name, (method, parameters) in expected.items():
        if method is None or list(inspect.signature(method).parameters) != parameters:
            return f"{name} is not the method the guard expects"
    if not all(hasattr(c, "connection_class") and hasattr(c, "connection_class_ssl")
               for c in (kombu_redis.Channel, kombu_redis.SentinelChannel)):
        return "kombu's Redis channels no longer name their connection classes"
    return None


def install(app: Any, transport: str) -> None:
    """Make ``transport`` (TRANSPORT or SENTINEL_TRANSPORT) the app's broker transport, kept across kombu's
    failover rotation: the worker's start-up step calls this once ``applicable()`` said yes."""
    app.conf.broker_transport = transport
    if app.amqp.Connection is kombu.Connection:  # an app that brings its own Connection class keeps it
        app.amqp.Connection = Connection


class Refused(redis.ResponseError):
    """A reply in REFUSALS: the broker is out for the moment, so kombu's transport counts it a connection error."""

    def __repr__(self) -> str:  # redis-py's repr drops the reply, which Celery's log lines are made of
        return f"Refused({str(self)!r})"


def refusal(exc: redis.ResponseError) -> str | None:
    """The reply's code when it is in REFUSALS (also behind EXECABORT: a transaction a refusal discarded)."""
    code = getattr(exc, "status_code", None) or str(exc).split(" ", 1)[0]
    if code == "EXECABORT":
        code = str(exc).rpartition("because of: ")[2].split(" ", 1)[0]
    return code if code in REFUSALS else None


class _RefusalsAreOutages:
    """Mixed into the channels' Redis connection classes: a refusal is raised as ``Refused``."""

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        except redis.ResponseError as exc:
            code = None if isinstance(exc, Refused) else refusal(exc)
            if code is None:
                raise
            refused = Refused(str(exc) if str(exc).startswith(code) else f"{code} {exc}")  # redis-py strips some
            refused.status_code = code
            raise refused from exc


class RedisConnection(_RefusalsAreOutages, redis.Connection):
    pass


class RedisSSLConnection(_RefusalsAreOutages, redis.SSLConnection):
    pass


class SentinelManagedConnection(_RefusalsAreOutages, sentinel.SentinelManagedConnection):
    pass


class SentinelManagedSSLConnection(_RefusalsAreOutages, kombu_redis.SentinelManagedSSLConnection):
    pass


def _guarded_connparams(self: Any, asynchronous: bool = False) -> Any:
    if self.connection is None or self.connection.client is None:
        raise redis.ConnectionError("broker connection already closed")
    return kombu_redis.Channel._connparams(self, asynchronous=asynchronous)


class QoS(kombu_redis.QoS):
    def append(self, message: Any, delivery_tag: Any) -> None:
        try:
            super().append(message, delivery_tag)
        except (Refused, redis.ConnectionError, redis.TimeoutError) as exc:
            # BRPOP already took the message off the queue: dropping it here would lose it for good.
            log.warning("P2.8A.3: broker did not record message %s as unacknowledged (%s); delivered anyway",
                        delivery_tag, exc)
            virtual.QoS.append(self, message, delivery_tag)


class Channel(kombu_redis.Channel):
    QoS = QoS
    _connparams = _guarded_connparams
    connection_class = RedisConnection
    connection_class_ssl = RedisSSLConnection


class SentinelChannel(kombu_redis.SentinelChannel):
    QoS = QoS
    _connparams = _guarded_connparams
    connection_class = SentinelManagedConnection
    connection_class_ssl = SentinelManagedSSLConnection


class Transport(kombu_redis.Transport):
    Channel = Channel
    connection_errors = (*kombu_redis.Transport.connection_errors, Refused)


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel
    connection_errors = (*kombu_redis.SentinelTransport.connection_errors, Refused)


#: kombu's transport for an alternate URL -> the guard of the same kind.
GUARDS: dict[type, type] = {kombu_redis.Transport: Transport, kombu_redis.SentinelTransport: SentinelTransport}


def _resolved(transport: Any) -> type | None:
    try:
        cls = get_transport_cls(transport) if isinstance(transport, str) else transport
    except (KeyError, ImportError, AttributeError, ValueError):
        return None
    return cls if isinstance(cls, type) else None


#: Seconds between the worker's attempts to reach its broker again: kombu's ensure_connection() waits 2 s, then 2 s
#: more after each failed round (of every sentinel URL), so a worker whose round failed just before a promotion
#: (~2.5 s after a master's death) waited 4 s more; a refusal or a failover is over in seconds.
RECONNECT_S = 1.0


class Connection(kombu.Connection):
    """kombu's Connection, except that moving to an alternate URL keeps a guarded transport (bug 2), and that
    reconnecting retries every RECONNECT_S unless the caller says otherwise."""

    def ensure_connection(self, errback: Any = None, max_retries: int | None = None,
                          interval_start: float = RECONNECT_S, interval_step: float = 0.0,
                          interval_max: float = RECONNECT_S, **kwargs: Any) -> Any:
        return super().ensure_connection(errback, max_retries, interval_start, interval_step, interval_max,
                                         **kwargs)

    def switch(self, conn_str: str) -> None:
        guarded = _resolved(self.transport_cls) in GUARDS.values()
        super().switch(conn_str)
        guard = GUARDS.get(_resolved(self.transport_cls))  # type: ignore[arg-type]
        if guarded and guard is not None:
            self.transport_cls = f"{__name__}:{guard.__name__}"
