"""The observer's Redis state: clients, error classes, and the atomic steps.

Each step is one Lua script under ``redis_scripts/``, called through redis-py's ``Script`` (EVALSHA, loading
the script again after a Redis restart): admit.lua and heartbeat.lua stand alone (``redis-cli --eval`` runs
them); the observe steps (early, look, wake, finish, sweep and the sweep's overdue list) share
observe_lib.lua and are loaded as ``F`` (the names keys.py owns, generated) + observe_lib.lua + the step's file,
with their arguments by name (ARGV as name, value pairs) and every key they touch in KEYS. Every time that decides an
outcome is Redis's own ``TIME``, read inside the script: hosts' clocks never count. A step checks all that can
fail before its first write, so a step that raises wrote nothing: the plan stays leased and recordable.
"""

from __future__ import annotations

import contextlib
import json
import re
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
    SWEEP_BATCH,
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


_SCRIPTS = files("observer_tasks.core.redis_scripts")
#: The observe steps, each loaded with the facts and observe_lib.lua in front of it.
OBSERVE_STEPS = ("early", "look", "wake", "finish", "sweep", "overdue")
_LUA_NAME = re.compile(r"[a-z_]+")
_LUA_VALUE = re.compile(r"[A-Za-z0-9_|:.+\-]*")


def lua_facts_source() -> str:
    """The Lua table F of the names keys.py owns, as every observe step sees it."""
    items = []
    for name, value in K.lua_facts().items():
        assert _LUA_NAME.fullmatch(name) and _LUA_VALUE.fullmatch(value), (name, value)  # safe in '...' quotes
        items.append(f"{name} = '{value}'")
    return "-- Generated by store.py from keys.py.\nlocal F = {" + ", ".join(items) + "}\n"


def step_source(name: str) -> str:
    """The text Redis runs for a step: admit and heartbeat as they are, an observe step composed."""
    own = _SCRIPTS.joinpath(f"{name}.lua").read_text()
    if name not in OBSERVE_STEPS:
        return own
    return lua_facts_source() + _SCRIPTS.joinpath("observe_lib.lua").read_text() + own


def _script(client: redis.Redis, name: str) -> Any:
    return client.register_script(step_source(name))


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


class Woken(dict[str, Outcome]):
    """The wake step's answer: the outcomes of the plans it recorded, and in ``skipped`` {plan: error} of those
    whose record failed (they wrote nothing and stay leased)."""

    def __init__(self, recorded: dict[str, Outcome], skipped: dict[str, str]) -> None:
        super().__init__(recorded)
        self.skipped = skipped


class Sweep(NamedTuple):
    """sweep()'s answer: Redis now (ms), plans recorded, leases freed (unreadable), the recorded plans' outcomes,
    and {plan: error} of those whose record failed (kept, passed over)."""

    now_ms: int
    recorded: int
    freed: list[str]
    outcomes: dict[str, Outcome]
    skipped: dict[str, str]


def _outcomes(flat: list[Any]) -> dict[str, Outcome]:
    return {_text(flat[i]): Outcome(_text(flat[i + 1]), int(flat[i + 2])) for i in range(0, len(flat) - 2, 3)}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(reply: list[Any]) -> dict[str, str]:
    return {_text(reply[i]): _text(reply[i + 1]) for i in range(0, len(reply), 2)}


class Store:
    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings = settings
        self.client = client
        self.keys = K.Keys.from_settings(settings)
        self._admit = _script(client, "admit")
        self._heartbeat = _script(client, "heartbeat")
        self._probe = _script(client, "probe")
        self._steps = {name: _script(client, name) for name in OBSERVE_STEPS}
        self._buckets = heat_wait_buckets(settings)

    def _call(self, script: Any, keys: list[str], args: list[Any], client: Any = None) -> Any:
        try:
            return script(keys=keys, args=args, client=client)
        except redis.RedisError as exc:
            if is_access_refused(exc):
                raise AccessRefused(refused_text(exc)) from exc
            if is_unavailable(exc):
                raise Unavailable(f"{type(exc).__name__}: {exc}"[:200]) from exc
            raise

    def _step(self, name: str, keys: list[str], client: Any = None, **named: Any) -> Any:
        """Run an observe step with its arguments by name: ARGV is name, value pairs, lists and objects as JSON
        (decoded by the step only where it uses them: a JSON object per call would cost every look)."""
        args: list[Any] = []
        for arg, value in named.items():
            args += [arg, value if isinstance(value, str | int) else json.dumps(value)]
        return self._call(self._steps[name], keys, args, client)

    def _late_keys(self) -> list[str]:
        """KEYS[1..6] of every late step (late_recorder in observe_lib.lua)."""
        return [K.INFLIGHT, K.LEASES, self.keys.stream, K.COUNTERS, K.HEAT_WAIT, K.UNSENT]

    def _record(self, context: dict[str, Any] | None = None) -> dict[str, Any]:
        """The named arguments every record needs."""
        s = self.settings
        return {"ttl_s": s.dedupe_ttl_sec, "maxlen": STREAM_MAXLEN, "debug_cap": s.max_debug_chars,
                "slack_ms": s.late_obs_poll_ms, "buckets": self._buckets, "context": context or {}}

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
             age_ms, token, K.DROPPED],
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
                self.client.hincrby(K.COUNTERS, K.Keys.unreplicated_field(step), 1)
        except redis.RedisError:
            pass  # the step itself succeeded; the next one meets the outage

    def observe_early(self, plan_id: str, symbol: str, apply_decision: str,
                      context: dict[str, Any] | None = None, client: Any = None) -> Any:
        """The early observer in one round trip: the reason recorded, or 'duplicate'. ``context`` goes into
        debug_json (a call recorded late says how late); with a pipeline as ``client``, see ``admit``."""
        s = self.settings
        reply = self._step(
            "early", [self.keys.heat(plan_id), self.keys.dedupe(K.OBS_EARLY, plan_id), self.keys.stream, K.COUNTERS],
            client, plan=plan_id, symbol=symbol, decision=apply_decision, ttl_s=s.dedupe_ttl_sec,
            maxlen=STREAM_MAXLEN, debug_cap=s.max_debug_chars, context=context or {})
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
    def note_failed(self, plan_id: str, cause: str) -> None:
        """Remember why a step could not record a plan (its lease stays); whoever records it later puts the
        cause in debug_json ("failed"). Best effort: it raises like any Redis call."""
        try:
            self.client.hset(K.UNSENT, K.NOTE_FAILED + plan_id, cause[:200])
        except redis.RedisError as exc:
            raise Unavailable(str(exc)[:200]) from exc

    def look(self, plan_id: str, polls: int, errors: int, deadline_ms: int = 0) -> Look:
        """One look at a leased plan: recorded (heat there or deadline passed), gone, pending, or lost (no
        lease and no record for a message younger than the dedupe window: counted once)."""
        reply = self._step(
            "look", [*self._late_keys(), K.WAKE_OK, K.WAKE_DEGRADED, self.keys.heat(plan_id),
                     self.keys.dedupe(K.OBS_LATE, plan_id)],
            plan=plan_id, polls=polls, errors=errors, message_deadline_ms=deadline_ms, **self._record())
        status = _text(reply[0])
        if status == "recorded":
            self.replicated("record")
            return Look(status, _text(reply[1]), wait_ms=int(reply[2]))
        if status == "pending":
            return Look(status, "", int(reply[1]), int(reply[2]), bool(int(reply[3])))
        return Look(status)

    def finish(self, plan_id: str, reason: str, context: dict[str, Any]) -> Look:
        """Record an outcome decided outside Redis (redis_error): 'recorded' (with the wait) or 'gone'."""
        reply = self._step("finish", [*self._late_keys(), self.keys.dedupe(K.OBS_LATE, plan_id)],
                           plan=plan_id, reason=reason, path=K.RECORD_PATHS[0], polls=int(context.get("polls", 0)),
                           **self._record(context))
        if _text(reply[0]) == "recorded":
            self.replicated("record")
            return Look("recorded", _text(reply[1]), wait_ms=int(reply[2]))
        return Look("gone")

    def wake(self, plan_ids: list[str], client: Any = None) -> Woken:
        """The wake step for a batch of plans whose heat hash was written: the outcomes of those recorded (and
        ``skipped``: those whose record failed)."""
        if not plan_ids:
            return Woken({}, {})
        plan_keys = [k for p in plan_ids for k in (self.keys.heat(p), self.keys.dedupe(K.OBS_LATE, p))]
        recorded, skipped = self._step("wake", [*self._late_keys(), *plan_keys], client, plans=plan_ids,
                                       **self._record())
        if recorded:
            self.replicated("record")
        return Woken(_outcomes(recorded), _pairs(skipped))

    def sweep(self, outages: list[tuple[int, int]]) -> Sweep:
        """Record every overdue lease, SWEEP_BATCH at a time: a page of overdue plans (overdue.lua), then the
        sweep step with their dedupe keys in KEYS. Skipped plans stay leased and are passed over, not retried,
        in this sweep, so they never block the others."""
        recorded, offset = 0, 0
        freed: list[str] = []
        outcomes: dict[str, Outcome] = {}
        skipped: dict[str, str] = {}
        while True:
            now_reply, page_reply = self._step("overdue", [K.INFLIGHT], offset=offset, limit=SWEEP_BATCH)
            page = [_text(p) for p in page_reply]
            if not page:
                return Sweep(int(now_reply), recorded, freed, outcomes, skipped)
            plans = [p for p in page if K.valid_plan_id(p)]
            foreign = [p for p in page if not K.valid_plan_id(p)]
            reply = self._step(
                "sweep", [*self._late_keys(), *(self.keys.dedupe(K.OBS_LATE, p) for p in plans)],
                plans=plans, foreign=foreign, outages=[list(o) for o in outages], **self._record())
            recorded += int(reply[1])
            freed += [_text(p) for p in reply[2]]
            outcomes.update(_outcomes(reply[4]))
            page_skipped = _pairs(reply[3])
            skipped.update(page_skipped)
            offset += len(page_skipped)
            if int(reply[1]):
                self.replicated("record")
            if len(page) < SWEEP_BATCH:
                return Sweep(int(reply[0]), recorded, freed, outcomes, skipped)

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
