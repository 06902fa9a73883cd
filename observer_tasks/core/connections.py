"""The one factory of the observer's Redis clients, and what a Redis failure means.

Every connection of every role (the apply layer's calls and its outbox thread, the worker's looks, wake
listener, sweeper and heartbeat, /metrics, the CLI) is made here: fail fast (no retries, bounded connect and
reads), named ``observer_tasks:<role>`` in CLIENT LIST, and through Sentinel for a ``redis+sentinel://`` URL.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.sentinel
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.retry import Retry

from .settings import Settings
from .urls import is_sentinel, parse_sentinel_url

#: Replies that mean "Redis cannot answer now", not "the data is bad": busy with a script, loading, a replica
#: that is read-only or lost its master, refusing for memory. An outage: calls are kept and made again later.
UNAVAILABLE_REPLIES = ("BUSY", "LOADING", "MASTERDOWN", "READONLY", "OOM", "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS")
#: Replies that mean Redis refuses the observer's user: a wrong or missing password (WRONGPASS, NOAUTH) or a
#: missing ACL permission (NOPERM). A configuration error, never an outage: waiting will not fix it.
ACCESS_REPLIES = ("NOPERM", "NOAUTH", "WRONGPASS")
#: How Redis 7.0 words an ACL refusal inside a script (an ERR reply, not NOPERM).
SCRIPT_ACCESS_REPLY = "The user executing the script can't"


class Unavailable(Exception):
    """Redis could not be asked (connection, timeout) or refused to answer now (BUSY, READONLY, OOM ...)."""


class AccessRefused(Exception):
    """Redis refused the observer's user (NOPERM, NOAUTH, WRONGPASS): fix the password or the ACL."""


def _reply_code(exc: redis.ResponseError) -> str:
    # redis-py strips the code of replies it maps to a class (READONLY -> ReadOnlyError, OOM, LOADING ...)
    # and keeps it in status_code; others (BUSY) keep it at the start of the message.
    return str(getattr(exc, "status_code", None) or str(exc).split(" ", 1)[0]).upper()


def failure_kind(exc: BaseException) -> str:
    """What a failed Redis call means: 'config_error' (the user is refused), 'unavailable' (an outage worth
    waiting out: a timeout, a lost connection, or a reply saying 'not now'), or 'error' (the data or the step:
    waiting will not help). The one classification of the package."""
    cause = exc.__cause__ if isinstance(exc, Unavailable | AccessRefused) and exc.__cause__ else exc
    if isinstance(cause, AccessRefused):
        return "config_error"
    if isinstance(cause, Unavailable):
        return "unavailable"
    if isinstance(cause, redis.AuthenticationError | redis.exceptions.AuthorizationError
                  | redis.exceptions.NoPermissionError):
        return "config_error"
    if isinstance(cause, redis.ResponseError):
        code = _reply_code(cause)
        if code in ACCESS_REPLIES or SCRIPT_ACCESS_REPLY in str(cause):
            return "config_error"
        return "unavailable" if code in UNAVAILABLE_REPLIES else "error"
    if isinstance(cause, redis.ConnectionError | redis.TimeoutError | OSError):
        return "unavailable"
    return "error"


#: Replies that mean the server was demoted or restarted: writes it acknowledged before may be gone.
LOSS_REPLIES = ("READONLY", "LOADING", "MASTERDOWN", "UNBLOCKED")


def may_have_lost_writes(exc: BaseException) -> bool:
    """A failure after which writes Redis acknowledged may be gone: the connection was lost or refused (a server
    that died, then a failover or a restart), or the server says it was demoted or is loading. A timeout or a
    busy server loses nothing (its writes stay), so the recheck of recent admissions is not needed for those."""
    cause = exc.__cause__ if isinstance(exc, Unavailable | AccessRefused) and exc.__cause__ else exc
    if isinstance(cause, redis.TimeoutError):
        return False
    if isinstance(cause, redis.ResponseError):
        return _reply_code(cause) in LOSS_REPLIES
    return isinstance(cause, redis.ConnectionError | ConnectionError)


def classified(exc: redis.RedisError) -> Exception:
    """The exception to raise for a failed Redis call: AccessRefused, Unavailable, or the error itself."""
    kind = failure_kind(exc)
    text = f"{type(exc).__name__}: {exc}"[:200]
    if kind == "config_error":
        return AccessRefused(text)
    if kind == "unavailable":
        return Unavailable(text)
    return exc


def describe(exc: BaseException) -> str:
    """One short line for a failure: its type and message (a pipeline's error names its command first); it
    never holds a password (Redis's replies do not)."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    return f"{type(cause).__name__}: {str(cause).split(' of pipeline caused error: ')[-1]}"[:200]


def redis_client(url: str, timeout_s: float, role: str, settings: Settings | None = None,
                 **extra: Any) -> redis.Redis:
    """A fail-fast client named ``observer_tasks:<role>`` that follows the master through Sentinel.

    redis-py 8 retries three times with exponential backoff by default, and its sockets wait forever; the
    observer must never stall its caller that way. With Sentinel every new connection asks the sentinels for
    the master, and a connection that meets READONLY (its server was demoted) is dropped, so after a failover
    the next call reaches the new master. ``settings`` gives the sentinels' own credentials; ``extra`` goes to
    the connections (the wake listener's ``protocol``).
    """
    options: dict[str, Any] = {
        "socket_timeout": timeout_s, "socket_connect_timeout": timeout_s, "retry": Retry(NoBackoff(), 0),
        "retry_on_timeout": False, "health_check_interval": 0, "client_name": f"observer_tasks:{role}", **extra,
    }
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **options)
    target = parse_sentinel_url(url)
    server = parse_url(target.server_url())
    server.pop("host", None)
    if server.pop("connection_class", None) is not None:  # rediss: Sentinel picks its own TLS connection class
        server["ssl"] = True
    at_sentinels = {k: v for k, v in options.items() if k not in ("protocol", "retry_on_timeout")}
    at_sentinels.update(settings.sentinel_auth() if settings else {})
    if target.tls:
        at_sentinels.update(ssl=True, **{k: v for k, v in server.items() if k.startswith("ssl")})
    sentinel = redis.sentinel.Sentinel(target.sentinels, sentinel_kwargs=at_sentinels)
    return sentinel.master_for(target.service, **server, **options)


def follow_master(client: redis.Redis) -> bool:
    """For a Sentinel client: ask the sentinels for the master now. redis-py then drops the pool's idle
    connections when the answer changed. Needed on a period: a connection made while a failover was under way
    can sit on the demoted master, where reads still answer (only a write meets READONLY). False when no
    sentinel answered (the pool keeps what it has)."""
    pool = client.connection_pool
    if isinstance(pool, redis.sentinel.SentinelConnectionPool):
        try:
            pool.get_master_address()
        except redis.RedisError:
            return False
    return True


def master_address(pool: redis.ConnectionPool, fresh: bool = False) -> str:
    """host:port of the server a client's connections go to: for Sentinel the master it last found, or
    (``fresh``) the one the sentinels name now (raises MasterNotFoundError, a ConnectionError, when none does)."""
    if isinstance(pool, redis.sentinel.SentinelConnectionPool):
        address = (None if fresh else pool.master_address) or pool.get_master_address()
        return f"{address[0]}:{address[1]}"
    kwargs = pool.connection_kwargs
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
