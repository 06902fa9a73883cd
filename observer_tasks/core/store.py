"""The observer's Redis state: clients, error classes, and the atomic steps (admit, observe, heartbeat).

Each step is one Lua script under ``redis_scripts/`` (loadable on its own with ``redis-cli --eval``),
called through redis-py's ``Script`` (EVALSHA, loading the script again after a Redis restart). Every
time that decides an outcome is Redis's own ``TIME``, read inside the script: hosts' clocks never count.
"""

from __future__ import annotations

import contextlib
import json
from importlib.resources import files
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import redis
import redis.sentinel
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.retry import Retry

from . import keys as K
from .settings import (
    SENTINEL_SCHEMES,
    STREAM_MAXLEN,
    WAKE_HEALTH_TTL_MS,
    WORKER_FORGET_MS,
    Settings,
    parse_sentinel_url,
    redact_url,
)

#: Replies that mean "Redis cannot answer now", not "the data is bad": the server is busy with a script,
#: loading, a replica that is read-only or lost its master, refusing for memory.
UNAVAILABLE_REPLIES = ("BUSY", "LOADING", "MASTERDOWN", "READONLY", "OOM", "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS")
#: Replies that mean Redis refuses the observer's user: a wrong or missing password (WRONGPASS, NOAUTH) or a
#: missing ACL permission (NOPERM). A configuration error, never an outage: waiting will not fix it.
ACCESS_REPLIES = ("NOPERM", "NOAUTH", "WRONGPASS")
#: How Redis 7.0 words an ACL refusal inside a script (an ERR reply, not NOPERM).
SCRIPT_ACCESS_REPLY = "The user executing the script can't"


#: The plan id the start-up check names its keys with (nothing is read or written under it).
PROBE_PLAN = "p28-access-check"


class Unavailable(Exception):
    """Redis could not be asked (connection, timeout) or refused to answer now (BUSY, READONLY, OOM ...)."""


class AccessRefused(Exception):
    """Redis refused the observer's user (NOPERM, NOAUTH, WRONGPASS): fix the password or the ACL."""


def _reply_code(exc: redis.ResponseError) -> str:
    # redis-py strips the code of replies it maps to a class (READONLY -> ReadOnlyError, OOM, LOADING ...)
    # and keeps it in status_code; others (BUSY) keep it at the start of the message.
    return str(getattr(exc, "status_code", None) or str(exc).split(" ", 1)[0]).upper()


def is_access_refused(exc: BaseException) -> bool:
    # redis-py raises AuthenticationError (a ConnectionError) for WRONGPASS and NOAUTH, NoPermissionError for NOPERM.
    if isinstance(exc, redis.AuthenticationError | redis.exceptions.AuthorizationError
                       | redis.exceptions.NoPermissionError):
        return True
    return isinstance(exc, redis.ResponseError) and (_reply_code(exc) in ACCESS_REPLIES
                                                     or SCRIPT_ACCESS_REPLY in str(exc))


def is_unavailable(exc: BaseException) -> bool:
    if is_access_refused(exc):
        return False
    if isinstance(exc, redis.ResponseError):
        return _reply_code(exc) in UNAVAILABLE_REPLIES
    return isinstance(exc, redis.ConnectionError | redis.TimeoutError | OSError)


def refused_text(exc: BaseException) -> str:
    """One line for a refused user: Redis's reply (it never holds the password)."""
    return f"{type(exc).__name__}: {exc}"[:200]


def redis_client(url: str, timeout_s: float, role: str, settings: Settings | None = None,
                 **extra: Any) -> redis.Redis:
    """The one factory of the observer's Redis clients: fails fast (no retries, bounded connect and reads),
    named ``observer_tasks:<role>``, and follows the master through Sentinel for a ``redis+sentinel://`` URL.

    redis-py 8 retries three times with exponential backoff by default, and its sockets wait forever;
    the observer must never stall its caller that way. The name shows in CLIENT LIST. With Sentinel every
    new connection asks the sentinels for the master, and a connection that meets READONLY (its server was
    demoted) is dropped, so after a failover the next call reaches the new master. ``settings`` gives the
    sentinels' own credentials; ``extra`` goes to the connections (the wake listener's ``protocol``).
    """
    options: dict[str, Any] = {
        "socket_timeout": timeout_s, "socket_connect_timeout": timeout_s, "retry": Retry(NoBackoff(), 0),
        "retry_on_timeout": False, "health_check_interval": 0, "client_name": f"observer_tasks:{role}", **extra,
    }
    if url.split("://", 1)[0] not in SENTINEL_SCHEMES:
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


def follow_master(client: redis.Redis) -> None:
    """For a Sentinel client: ask the sentinels for the master now. redis-py then drops the pool's idle
    connections when the answer changed. Needed on a period: a connection made while a failover was under way
    can sit on the demoted master, where reads still answer (only a write meets READONLY)."""
    pool = client.connection_pool
    if isinstance(pool, redis.sentinel.SentinelConnectionPool):
        with contextlib.suppress(redis.RedisError):  # no sentinel answers: keep what the pool has
            pool.get_master_address()


def master_address(pool: redis.ConnectionPool, fresh: bool = False) -> str:
    """host:port of the server a client's connections go to: for Sentinel the master it last found, or
    (``fresh``) the one the sentinels name now (raises MasterNotFoundError, a ConnectionError, when none does)."""
    if isinstance(pool, redis.sentinel.SentinelConnectionPool):
        address = (None if fresh else pool.master_address) or pool.get_master_address()
        return f"{address[0]}:{address[1]}"
    kwargs = pool.connection_kwargs
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


def _script(client: redis.Redis, name: str) -> Any:
    return client.register_script(files("observer_tasks.core.redis_scripts").joinpath(name).read_text())


class Admission(NamedTuple):
    """admit()'s answer: 'admitted', 'duplicate' or 'dropped', with the plan's times (Redis ms)."""

    status: str
    published_ms: int
    deadline_ms: int


class Look(NamedTuple):
    """One look's answer: 'recorded' (with its reason and wait), 'gone' (no lease: nothing to do) or 'pending'."""

    status: str
    reason: str = ""
    now_ms: int = 0
    deadline_ms: int = 0
    wake_healthy: bool = False
    wait_ms: int = 0


class Outcome(NamedTuple):
    """A recorded plan's outcome, as its stream entry has it (for the plan's final state in Flower)."""

    reason: str
    wait_ms: int


class Sweep(NamedTuple):
    """sweep()'s answer: Redis now (ms), plans recorded and leases freed, and the recorded plans' outcomes."""

    now_ms: int
    recorded: int
    freed: int
    outcomes: dict[str, Outcome]


def _outcomes(flat: list[Any]) -> dict[str, Outcome]:
    return {_text(flat[i]): Outcome(_text(flat[i + 1]), int(flat[i + 2])) for i in range(0, len(flat) - 2, 3)}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Store:
    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings = settings
        self.client = client
        self.keys = K.Keys.from_settings(settings)
        self._admit = _script(client, "admit.lua")
        self._observe = _script(client, "observe.lua")
        self._heartbeat = _script(client, "heartbeat.lua")
        self._probe = _script(client, "probe.lua")
        self._bounds = " ".join(str(b) for b in heat_wait_buckets(settings))

    def _call(self, script: Any, keys: list[str], args: list[Any], client: Any = None) -> Any:
        try:
            return script(keys=keys, args=args, client=client)
        except redis.RedisError as exc:
            if is_access_refused(exc):
                raise AccessRefused(refused_text(exc)) from exc
            if is_unavailable(exc):
                raise Unavailable(f"{type(exc).__name__}: {exc}"[:200]) from exc
            raise

    def _observe_call(self, mode: str, plans: list[str], obs_point: str = K.OBS_LATE, a: Any = "", b: Any = "",
                      context: dict[str, Any] | None = None, client: Any = None, tail: tuple[Any, ...] = ()) -> Any:
        s = self.settings
        plan_keys = [k for p in plans for k in (self.keys.heat(p), self.keys.dedupe(obs_point, p))]
        return self._call(
            self._observe,
            [K.INFLIGHT, K.LEASES, self.keys.stream, K.COUNTERS, K.HEAT_WAIT, K.UNSENT, K.WAKE_OK, K.WAKE_DEGRADED,
             *plan_keys],
            [mode, s.dedupe_ttl_sec, STREAM_MAXLEN, s.max_debug_chars, s.late_obs_poll_ms, self._bounds,
             json.dumps(context or {}), a, b, *plans, *tail],
            client,
        )

    def check_access(self) -> None:
        """Raise AccessRefused when Redis refuses this user the steps' scripts or their keys (nothing is written)."""
        plan = PROBE_PLAN
        self._call(self._probe, [K.INFLIGHT, K.LEASES, self.keys.stream, K.COUNTERS, K.HEAT_WAIT, K.UNSENT, K.WAKE_OK,
                                 K.WAKE_DEGRADED, self.keys.heat(plan), self.keys.dedupe(K.OBS_EARLY, plan),
                                 self.keys.dedupe(K.OBS_LATE, plan)], [])

    # -- the apply layer's steps ------------------------------------------------
    def admit(self, plan_id: str, symbol: str, apply_decision: str, token: str = "", age_ms: int = 0,
              client: Any = None) -> Any:
        """Take a lease for the plan (publish time and deadline from Redis TIME, less ``age_ms`` for a call
        admitted late), or count a drop. A retry with the same ``token`` finds its own lease: 'admitted'.
        With a pipeline as ``client`` the reply comes from its execute(): read it with ``admission``."""
        s = self.settings
        reply = self._call(
            self._admit, [K.INFLIGHT, K.LEASES, K.COUNTERS, self.keys.dedupe(K.OBS_LATE, plan_id)],
            [plan_id, s.late_obs_max_wait_ms, s.sweep_grace_ms, s.late_obs_max_inflight, symbol, apply_decision,
             age_ms, token],
            client,
        )
        if client is not None:
            return reply
        result = admission(reply)
        if result.status == "admitted":
            self.replicated("admit")
        return result

    def replicated(self, step: str) -> None:
        """With P28_REPLICA_WAIT_MS: WAIT for one replica to have the step's writes, at most that long.

        Redis replication is asynchronous: a write the master acknowledged can vanish in a failover. After
        WAIT 1 answers 1, the admission or record is on a replica too. A step no replica acknowledged in time
        is kept (it is on the master) and counted in p28_late_obs_unreplicated_total{step}, best effort.
        """
        wait_ms = self.settings.replica_wait_ms
        if not wait_ms:
            return
        try:
            if int(self.client.execute_command("WAIT", 1, wait_ms)) < 1:
                self.client.hincrby(K.COUNTERS, f"unreplicated|{step}", 1)
        except redis.RedisError:
            pass  # the step itself succeeded; the next one meets the outage

    def observe_early(self, plan_id: str, symbol: str, apply_decision: str,
                      context: dict[str, Any] | None = None, client: Any = None) -> Any:
        """The early observer in one round trip: the reason recorded, or 'duplicate'. ``context`` goes into
        debug_json (a call recorded late says how late); with a pipeline as ``client``, see ``admit``."""
        reply = self._observe_call("early", [plan_id], K.OBS_EARLY, symbol, apply_decision, context, client)
        return reply if client is not None else _text(reply)

    def settle(self, calls: list[tuple[str, str, str]]) -> list[Admission]:
        """Calls given up on after an attempt whose reply was lost, as (obs_point, plan, token): mark each
        settled, so the lost attempt cannot still count, and say what it did. Early: SET NX of its dedupe key
        ('refused' when set: the attempt never recorded; else 'duplicate'). Late: the call's own lease (its
        token) is 'admitted' with the lease's times (its message is still to be sent); otherwise SET NX of
        the late dedupe key, which admit.lua honours: 'refused' when set, else 'duplicate'."""
        pipe = self.client.pipeline(transaction=False)
        for obs_point, plan_id, _token in calls:
            if obs_point == K.OBS_LATE:
                pipe.hget(K.LEASES, plan_id)
            pipe.set(self.keys.dedupe(obs_point, plan_id), "refused", nx=True, ex=self.settings.dedupe_ttl_sec)
        try:
            replies = iter(pipe.execute())
        except redis.RedisError as exc:
            raise Unavailable(str(exc)[:200]) from exc
        out = []
        for obs_point, _plan_id, token in calls:
            lease: Any = {}
            if obs_point == K.OBS_LATE:
                raw = next(replies)
                with contextlib.suppress(ValueError, TypeError):
                    lease = json.loads(raw) if raw else {}
            was_set = bool(next(replies))
            if token and isinstance(lease, dict) and lease.get("token") == token:
                out.append(Admission("admitted", int(lease["published_ms"]), int(lease["deadline_ms"])))
            else:
                out.append(Admission("refused" if was_set else "duplicate", 0, 0))
        return out

    def add_counts(self, counts: dict[str, int]) -> None:
        """Add counts kept while Redis could not be reached (one round trip)."""
        pipe = self.client.pipeline(transaction=False)
        for field, n in counts.items():
            pipe.hincrby(K.COUNTERS, field, n)
        try:
            pipe.execute()
        except redis.RedisError as exc:
            if is_unavailable(exc):
                raise Unavailable(str(exc)[:200]) from exc
            raise

    def note_unsent(self, plan_ids: list[str], cause: str) -> None:
        """Remember why plans' first messages were never sent; the sweeper puts it in debug_json."""
        if plan_ids:
            try:
                self.client.hset(K.UNSENT, mapping=dict.fromkeys(plan_ids, cause[:200]))
            except redis.RedisError as exc:
                raise Unavailable(str(exc)[:200]) from exc

    # -- the worker's steps -------------------------------------------------------
    def look(self, plan_id: str, polls: int, errors: int, deadline_ms: int = 0) -> Look:
        """One look at a leased plan: recorded (heat there or deadline passed), gone, pending, or lost (no
        lease and no record for a message younger than the dedupe window: counted once)."""
        reply = self._observe_call("look", [plan_id], a=polls, b=errors, tail=(deadline_ms,))
        status = _text(reply[0])
        if status == "recorded":
            self.replicated("record")
            return Look(status, _text(reply[1]), wait_ms=int(reply[2]))
        if status == "pending":
            return Look(status, "", int(reply[1]), int(reply[2]), bool(int(reply[3])))
        return Look(status)

    def finish(self, plan_id: str, reason: str, context: dict[str, Any]) -> Look:
        """Record an outcome decided outside Redis (redis_error): 'recorded' (with the wait) or 'gone'."""
        reply = self._observe_call("finish", [plan_id], a=reason, b="look", context=context)
        if _text(reply[0]) == "recorded":
            self.replicated("record")
            return Look("recorded", _text(reply[1]), wait_ms=int(reply[2]))
        return Look("gone")

    def wake(self, plan_ids: list[str], client: Any = None) -> dict[str, Outcome]:
        """The wake step for a batch of plans whose heat hash was written: the outcomes of those recorded."""
        if not plan_ids:
            return {}
        reply = self._observe_call("wake", plan_ids, client=client)
        if reply:
            self.replicated("record")
        return _outcomes(reply)

    def sweep(self, outages: list[tuple[int, int]]) -> Sweep:
        """Record overdue leases (up to 200); call again while it records."""
        windows = " ".join(f"{start} {end}" for start, end in outages)
        now, recorded, freed, _plans, *outcomes = self._observe_call(
            "sweep", [], a=windows, b=f"quantum:dedupe:p28:{K.OBS_LATE}:", context={})
        if int(recorded):
            self.replicated("record")
        return Sweep(int(now), int(recorded), int(freed), _outcomes(outcomes))

    def leased_plans(self) -> list[str]:
        """Every plan under observation (for the wake listener's resync)."""
        try:
            return [_text(p) for p in self.client.hkeys(K.LEASES)]
        except redis.RedisError as exc:
            raise Unavailable(str(exc)[:200]) from exc

    def heartbeat(self, nodename: str, state: dict[str, Any], wake_state: str) -> int:
        """Write this worker's heartbeat and the wake path's health; returns Redis time (ms)."""
        return int(self._call(self._heartbeat, [K.WORKERS, K.WAKE_OK, K.WAKE_DEGRADED],
                              [nodename, json.dumps(state), wake_state, WAKE_HEALTH_TTL_MS, WORKER_FORGET_MS]))


def access_problem(settings: Settings, timeout_s: float) -> str | None:
    """Why Redis refuses the observer's user, in one line naming the URL and Redis's reply; None when it does not.

    Asks REDIS_URL (a PING, then the steps' scripts with their keys: probe.lua) and a Redis broker (a PING).
    Redis that cannot be reached is an outage, not a configuration error: None, and the caller goes on.
    """
    urls = [("REDIS_URL", settings.redis_url)]
    redis_broker = urlsplit(settings.broker).scheme in ("redis", "rediss", *SENTINEL_SCHEMES)
    if redis_broker and settings.broker != settings.redis_url:
        urls.append(("CELERY_BROKER_URL", settings.broker))
    for name, url in urls:
        client = redis_client(url, timeout_s, "check", settings)
        try:
            client.ping()
            if name == "REDIS_URL":
                Store(settings, client).check_access()
        except (redis.RedisError, AccessRefused, Unavailable) as exc:
            cause = exc.__cause__ if isinstance(exc, AccessRefused) else exc
            if cause is not None and is_access_refused(cause):
                return (f"{name}={redact_url(url)}: Redis refuses the user ({refused_text(cause)}): fix the password "
                        "in the URL or the user's ACL (deploy/redis/users.acl)")
        finally:
            client.close()
    return None


def admission(reply: Any) -> Admission:
    status, published, deadline = reply
    return Admission(_text(status), int(published), int(deadline))


def heat_wait_buckets(settings: Settings) -> list[int]:
    """Upper bounds (ms) of the heat-wait histogram: fine below 1 s (the wake path detects in ms),
    then fractions of MAX_WAIT_MS so it can be tuned from data."""
    wait = settings.late_obs_max_wait_ms
    bounds = {5, 10, 25, 50, 100, 250, 500, 1000, *(int(wait * f) for f in (0.25, 0.5, 0.75, 1.0, 1.25))}
    return sorted(b for b in bounds if 0 < b <= wait * 1.25)
