"""The observer's Redis state, owned here: every step run one way, its failure classified, its reply typed.

``Ledger.run`` is the one function that runs a step (steps.py declares them): it builds KEYS and ARGV in the
declared order, calls the script through redis-py's ``Script`` (EVALSHA, loading it again after a Redis
restart or a failover), and raises ``AccessRefused`` or ``Unavailable`` (connections.py) for a failure that is
not the data's. The methods below give each step its keys and arguments by name and its reply as a value.
Every time that decides an outcome is Redis's own TIME, read inside the step: hosts' clocks never count.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import redis

from . import contract as C
from .connections import AccessRefused, Unavailable, classified
from .inputs import valid_plan_id
from .settings import LATE_POINT, Settings
from .steps import STEPS, texts
from .timings import GAPS_KEEP_MS, GAPS_MAX, STREAM_MAXLEN, SWEEP_BATCH, WAKE_HEALTH_TTL_MS, WORKER_FORGET_MS

#: The plan id the start-up access check names its keys with (nothing is read or written under it).
PROBE_PLAN = "p28-access-check"


class Admission(NamedTuple):
    """An admission's answer: admitted | kept (its own lease, found again) | recorded | duplicate | dropped |
    backlog, with the plan's times (Redis ms) and, when recorded at once, its reason."""

    status: str
    published_ms: int
    deadline_ms: int
    reason: str = ""


class Recorded(NamedTuple):
    """A recorded plan's outcome, as its stream entry has it (and its final state in Flower)."""

    reason: str
    wait_ms: int


class Pending(NamedTuple):
    """A look that found the plan waiting: Redis now, its deadline, and whether the wake path is healthy."""

    now_ms: int
    deadline_ms: int
    wake_healthy: bool


#: A look's answer: Recorded, Pending, or GONE (someone else recorded it) / LOST (its admission vanished).
GONE, LOST = "gone", "lost"
Look = Recorded | Pending | str


class Batch(NamedTuple):
    """A wake or sweep step's answer: the plans it recorded, those it could not ({plan: error}, still leased),
    those it freed (unreadable: nobody can record them), and Redis now (ms)."""

    recorded: dict[str, Recorded]
    skipped: dict[str, str]
    freed: list[str]
    now_ms: int = 0


def heat_wait_buckets(settings: Settings) -> list[int]:
    """Upper bounds (ms) of the heat-wait histogram: fine below 1 s (the wake path detects in ms), then
    fractions of MAX_WAIT_MS so it can be tuned from data."""
    wait = settings.late_obs_max_wait_ms
    bounds = {5, 10, 25, 50, 100, 250, 500, 1000, *(int(wait * f) for f in (0.25, 0.5, 0.75, 1.0, 1.25))}
    return sorted(b for b in bounds if 0 < b <= wait * 1.25)


def _recorded(flat: Sequence[Any]) -> dict[str, Recorded]:
    values = texts(flat)
    return {values[i]: Recorded(values[i + 1], int(values[i + 2])) for i in range(0, len(values) - 2, 3)}


def _pairs(flat: Sequence[Any]) -> dict[str, str]:
    values = texts(flat)
    return dict(zip(values[::2], values[1::2], strict=True))


class Ledger:
    """The steps on one Redis client; ``pipe`` arguments queue a step on a pipeline instead (read its reply
    from the pipeline's execute() with the step's ``decode``)."""

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings = settings
        self.client = client
        self.scripts = {name: client.register_script(step.source()) for name, step in STEPS.items()}
        self.record_args = {"ttl_s": settings.dedupe_ttl_sec, "maxlen": STREAM_MAXLEN,
                            "debug_cap": settings.max_debug_chars, "slack_ms": settings.late_obs_poll_ms,
                            "buckets": ",".join(map(str, heat_wait_buckets(settings))), "context": {}}

    def run(self, name: str, keys: Mapping[str, str], args: Mapping[str, Any] | None = None,
            items: Sequence[Mapping[str, str]] = (), pipe: Any = None) -> Any:
        """Run one step (or queue it on ``pipe``); its reply decoded, or AccessRefused / Unavailable raised."""
        step, args = STEPS[name], args or {}
        argv = [v if isinstance(v, str | int) else json.dumps(v) for v in (args[a] for a in step.arg_names)]
        argv += [item[a] for item in items for a in step.item_args]
        key_list = [keys[k] for k in step.keys] + [item[k] for item in items for k in step.item_keys]
        try:
            reply = self.scripts[name](keys=key_list, args=argv, client=pipe)
        except redis.RedisError as exc:
            raise classified(exc) from exc
        return reply if pipe is not None else step.decode(reply)

    # -- keys -----------------------------------------------------------------------------------------------------
    def heat_key(self, plan_id: str) -> str:
        return self.settings.heat_lookup_prefix + plan_id

    def lease_key(self, plan_id: str) -> str:
        return C.dedupe_key(LATE_POINT, plan_id)

    def record(self, context: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return {**self.record_args, "context": dict(context or {})}

    def late_keys(self, plan_id: str) -> dict[str, str]:
        return {"inflight": C.INFLIGHT, "lease": self.lease_key(plan_id), "heat": self.heat_key(plan_id),
                "stream": self.settings.obs_stream, "counters": C.COUNTERS, "wake": C.WAKE, "gaps": C.GAPS}

    # -- the apply layer's steps -----------------------------------------------------------------------------------
    def early(self, plan_id: str, symbol: str, decision: str, obs_point: str,
              context: Mapping[str, Any] | None = None, stale: bool = False, pipe: Any = None) -> Any:
        """The early observer in one round trip: the reason recorded, or 'duplicate'. ``stale``: the call is
        made too long after the apply layer's (Redis was unreachable): redis_error."""
        keys = {"heat": self.heat_key(plan_id), "dedupe": C.dedupe_key(obs_point, plan_id),
                "stream": self.settings.obs_stream, "counters": C.COUNTERS}
        args = {"plan": plan_id, "symbol": symbol, "decision": decision, "obs_point": obs_point,
                "stale": int(stale), **self.record(context)}
        return self.run("early", keys, args, pipe=pipe)

    def admit(self, plan_id: str, symbol: str, decision: str, token: str = "", age_ms: int = 0,
              context: Mapping[str, Any] | None = None, pipe: Any = None) -> Any:
        """Take a lease for the plan (publish time and deadline from Redis TIME, less ``age_ms`` for a call made
        late), or record it at once, or refuse it; a retry with the same ``token`` finds its own lease."""
        s = self.settings
        args = {"plan": plan_id, "symbol": symbol, "decision": decision, "token": token, "age_ms": int(age_ms),
                "max_wait_ms": s.late_obs_max_wait_ms, "grace_ms": s.sweep_grace_ms,
                "max_inflight": s.late_obs_max_inflight, "backlog_max": s.late_obs_max_inflight,
                **self.record(context)}
        reply = self.run("admit", self.late_keys(plan_id), args, pipe=pipe)
        return reply if pipe is not None else admission(reply)

    def count(self, counts: Mapping[str, int]) -> None:
        if not counts:
            return
        try:
            self.run("count", {"counters": C.COUNTERS}, {"counts": dict(counts)})
        except AccessRefused:
            # A user that may no longer run the steps' scripts (an ACL missing EVALSHA) still reports it: the
            # counts (config_error refusals) go in as plain HINCRBYs (one pipeline); refused too, AccessRefused.
            pipe = self.client.pipeline(transaction=False)
            for name, n in counts.items():
                pipe.hincrby(C.COUNTERS, name, n)
            try:
                pipe.execute()
            except redis.RedisError as exc:
                raise classified(exc) from exc

    def note(self, notes: Mapping[str, str], failed: bool = False) -> None:
        """Notes for the sweep ({plan: text}): why first messages were never sent, or (``failed``) the last error
        of a step that could not record the plan."""
        if notes:
            prefix = C.FAILED if failed else C.UNSENT
            items = [{"note": prefix + plan, "text": text[:200]} for plan, text in notes.items()]
            self.run("note", {}, {"ttl_s": self.settings.dedupe_ttl_sec}, items)

    def report(self, name: str, state: Mapping[str, Any]) -> None:
        self.run("report", {"producers": C.PRODUCERS},
                 {"name": name, "state": json.dumps(state), "forget_ms": WORKER_FORGET_MS})

    def replicated(self, step: str, client: Any = None) -> bool:
        """With P28_REPLICA_WAIT_MS: WAIT for one replica to have the writes so far; one no replica acknowledged
        in time stands (it is on the master) and is counted in p28_late_obs_unreplicated_total{step}."""
        wait_ms = self.settings.replica_wait_ms
        if not wait_ms:
            return True
        try:
            if int((client or self.client).execute_command("WAIT", 1, wait_ms)) >= 1:
                return True
            self.count({C.unreplicated_field(step): 1})
        except (redis.RedisError, Unavailable):
            pass  # the step itself succeeded; the next one meets the outage
        return False

    def replicated_after_write(self) -> bool:
        """WAIT for one replica to have every write the master took so far (a mark written first on this
        connection, since WAIT covers only the writes of its own connection): True when one acknowledged."""
        pipe = self.client.pipeline(transaction=False)
        pipe.set(C.REPLICA_MARK, "1", px=60_000)
        pipe.execute_command("WAIT", 1, self.settings.replica_wait_ms)
        try:
            return int(pipe.execute()[1]) >= 1
        except redis.RedisError as exc:
            raise classified(exc) from exc

    # -- the worker's steps --------------------------------------------------------------------------------------
    def look(self, plan_id: str, polls: int, errors: int, message_deadline_ms: int,
             unwatched_since_ms: int = 0) -> Look:
        """One look: Recorded, Pending, GONE or LOST. ``errors``: this chain's failed looks so far;
        ``unwatched_since_ms``: this worker has not reached Redis promptly since (a gap not yet recorded)."""
        reply = self.run("look", self.late_keys(plan_id),
                         {"plan": plan_id, "polls": polls, "errors": errors, "message_deadline_ms": message_deadline_ms,
                          "unwatched_since_ms": unwatched_since_ms, **self.record()})
        if reply[0] == "recorded":
            self.replicated("record")
            return Recorded(reply[1], int(reply[2]))
        if reply[0] == "pending":
            return Pending(int(reply[1]), int(reply[2]), reply[3] == "1")
        return str(reply[0])

    def finish(self, plan_id: str, reason: str, polls: int) -> Recorded | str:
        """Record an outcome decided outside Redis (redis_error): Recorded, or GONE."""
        reply = self.run("finish", self.late_keys(plan_id), {"plan": plan_id, "reason": reason, "polls": polls,
                                                              **self.record()})
        if reply[0] != "recorded":
            return GONE
        self.replicated("record")
        return Recorded(reply[1], int(reply[2]))

    def batch_items(self, plan_ids: Sequence[str]) -> list[dict[str, str]]:
        return [{"lease": self.lease_key(p), "heat": self.heat_key(p), "plan": p} for p in plan_ids]

    def wake(self, plan_ids: Sequence[str]) -> Batch:
        """The wake step for plans whose heat hash was written."""
        if not plan_ids:
            return Batch({}, {}, [])
        keys = {"inflight": C.INFLIGHT, "stream": self.settings.obs_stream, "counters": C.COUNTERS, "gaps": C.GAPS}
        recorded, skipped = self.run("wake", keys, self.record(), self.batch_items(plan_ids))
        if recorded:
            self.replicated("record")
        return Batch(_recorded(recorded), _pairs(skipped), [])

    def sweep(self) -> Batch:
        """Decide every plan whose lease has ended, SWEEP_BATCH at a time: a page of them (overdue), then the
        sweep step with their keys. Skipped plans stay leased and are passed over in this sweep."""
        out, offset, now = Batch({}, {}, []), 0, 0
        keys = {"inflight": C.INFLIGHT, "stream": self.settings.obs_stream, "counters": C.COUNTERS,
                "gaps": C.GAPS}
        while True:
            now_reply, page = self.run("overdue", {"inflight": C.INFLIGHT}, {"offset": offset, "limit": SWEEP_BATCH})
            page, now = texts(page), int(now_reply)
            if not page:
                break
            plans = [p for p in page if valid_plan_id(p)]
            foreign = [p for p in page if not valid_plan_id(p)]
            items = [{**item, "unsent": C.UNSENT + item["plan"], "failed": C.FAILED + item["plan"]}
                     for item in self.batch_items(plans)]
            reply = self.run("sweep", keys, {"foreign": foreign, **self.record()}, items)
            skipped = _pairs(reply[3])
            out.recorded.update(_recorded(reply[4]))
            out.skipped.update(skipped)
            out.freed.extend(texts(reply[2]))
            offset += len(skipped)
            if int(reply[1]):
                self.replicated("record")
            if len(page) < SWEEP_BATCH:
                break
        return out._replace(now_ms=now)

    def leased_plans(self) -> list[str]:
        """Every plan under observation (for the wake listener's resync)."""
        try:
            return texts(self.client.zrange(C.INFLIGHT, 0, -1))
        except redis.RedisError as exc:
            raise classified(exc) from exc

    def heartbeat(self, nodename: str, state: Mapping[str, Any], wake_state: str, gap_start_ms: int = 0) -> int:
        """Write this worker's heartbeat, a Redis gap it saw since ``gap_start_ms``, and the wake path's health;
        returns Redis time (ms)."""
        keys = {"workers": C.WORKERS, "wake": C.WAKE, "gaps": C.GAPS, "counters": C.COUNTERS}
        args = {"nodename": nodename, "state": json.dumps(dict(state)), "wake_state": wake_state,
                "gap_start_ms": gap_start_ms, "health_ttl_ms": WAKE_HEALTH_TTL_MS, "fresh_ms": WAKE_HEALTH_TTL_MS,
                "forget_ms": WORKER_FORGET_MS, "gaps_keep_ms": GAPS_KEEP_MS, "gaps_max": GAPS_MAX}
        return int(self.run("heartbeat", keys, args))

    def check_access(self) -> None:
        """Raise AccessRefused when Redis refuses this user the steps' scripts or their keys (nothing is run)."""
        plan, s = PROBE_PLAN, self.settings
        keys = {*self.late_keys(plan).values(), C.UNSENT + plan, C.FAILED + plan, C.WORKERS, C.PRODUCERS,
                *(C.dedupe_key(point, plan) for point in s.early_points)}
        try:
            self.scripts["probe"](keys=sorted(keys), args=[])
        except redis.RedisError as exc:
            raise classified(exc) from exc


def admission(reply: Sequence[Any]) -> Admission:
    values = texts(reply)
    return Admission(values[0], int(values[1]), int(values[2]), values[3] if len(values) > 3 else "")
