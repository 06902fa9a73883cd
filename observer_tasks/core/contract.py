"""The names of the Redis contract, defined once: keys, the stream's fields, reasons, counter fields, the lease.

Python imports them from here (the steps, the operator's tools, the demo, the benchmark, the tests); the Lua
steps get the ones they need as the generated table ``C`` (steps.py), so no name is written twice. Nothing
here does anything: like arq's constants, it is the vocabulary.
"""

from __future__ import annotations

from .settings import LATE_POINT

# -- keys -------------------------------------------------------------------------------------------------------
#: Every counter of every family, and the heat-wait histogram: one HASH (fields below).
COUNTERS = "quantum:p28:counters"
#: The ledger: plan -> its lease end (deadline + sweeper grace), Redis ms. A member is a plan not yet recorded.
INFLIGHT = "quantum:p28:late_obs:inflight"
#: Notes a sweep reads into debug_json, one key per plan that expires with the dedupe TTL (so none is left behind,
#: whoever records the plan): UNSENT + plan -> why its first message was never sent; FAILED + plan -> the last
#: error of a step that could not record it.
UNSENT = "quantum:p28:late_obs:unsent:"
FAILED = "quantum:p28:late_obs:failed:"
#: Exists (PX WAKE_HEALTH_TTL_MS) while the wake path is healthy (the rule: heartbeat.lua).
WAKE = "quantum:p28:late_obs:wake"
#: Windows in which the workers could not reach Redis: "start-end" -> end (Redis ms).
GAPS = "quantum:p28:late_obs:gaps"
#: Worker nodename -> JSON heartbeat (seen_ms on Redis's clock, wake state, limits, ...).
WORKERS = "quantum:p28:workers"
#: Written by an apply process's outbox just before it WAITs for a replica (P28_REPLICA_WAIT_MS): a write on
#: its own connection, so WAIT covers every write the master took before it.
REPLICA_MARK = "quantum:p28:late_obs:replica_mark"
#: Apply process (host pid) -> JSON of the limits it runs with (seen_ms on Redis's clock), for `status`.
PRODUCERS = "quantum:p28:producers"
#: A dedupe key is DEDUPE_PREFIX + "<obs_point>:<plan_id>" (the contract's name). For publish_plan_post the same
#: key holds the plan's lease while it is observed, then its record marker: one key per plan.
DEDUPE_PREFIX = "quantum:dedupe:p28:"

# -- the stream -------------------------------------------------------------------------------------------------
#: An entry's fields in the contract's order (operators' awk scripts rely on obs_point before heat_found).
STREAM_FIELDS = ("ts_epoch", "plan_id", "symbol", "apply_component", "obs_point", "heat_found", "heat_ts_epoch",
                 "heat_level", "heat_score", "heat_action", "heat_out_action", "heat_recommended_partial",
                 "heat_reason", "apply_decision", "debug_json")
#: What a publish_plan_post entry adds after them.
LATE_FIELDS = ("wait_ms", "polls", "recorded_by")
APPLY_COMPONENT = "apply"
#: The closed set of reasons (metrics cardinality depends on it); `ok` is the only one with heat_found=1.
REASONS = ("ok", "missing", "timeout", "redis_error", "parse_error")
#: Who recorded a publish_plan_post entry (p28_late_obs_recorded_total{path}): a look, the wake step, the
#: sweeper, or the admission itself (heat written before the call, or a call deferred past its whole window).
RECORD_PATHS = ("look", "wake", "sweep", "admit")

# -- the heat hash (HeatBridge's) -------------------------------------------------------------------------------
#: Stream field <- heat hash field, copied in this order.
HEAT_COPIED = (("heat_ts_epoch", "ts_epoch"), ("heat_level", "heat_level"), ("heat_score", "heat_score"),
               ("heat_action", "heat_action"), ("heat_out_action", "out_action"),
               ("heat_recommended_partial", "recommended_partial"))
#: Heat hash fields that go into debug_json when they fit.
HEAT_DEBUG = ("reason", "mode", "debug_json")
HEAT_LEVELS = ("cold", "warm", "hot", "unknown")
HEAT_ACTIONS = ("NONE", "DOWNGRADE_FULL_TO_PARTIAL", "HOLD_CLOSE")
#: Longest copied heat value (characters); a longer one makes the record a parse_error.
MAX_COPIED = 64
#: How a copied heat field is checked (besides being UTF-8 and at most MAX_COPIED long): one of the levels, one
#: of the actions, or a finite number.
HEAT_CHECKS = {"heat_level": "level", "heat_action": "action", "ts_epoch": "number", "heat_score": "number"}
#: What debug_json gives up first when it is over P28_MAX_DEBUG_CHARS: the heat hash's own debug fields, then
#: the step's explanations.
DEBUG_DROP_ORDER = ("debug_json", "mode", "reason", "parse", "failed", "cause", "gap")

# -- the lease ------------------------------------------------------------------------------------------------------
#: A publish_plan_post dedupe key holds LEASE + the fields joined by SEP while the plan is observed, then
#: RECORDED + its reason (EX the dedupe TTL), or LOST / REFUSED for an admission that vanished / a call settled.
LEASE, RECORDED, LOST, REFUSED = "L", "R", "X|lost", "X|refused"
SEP = "|"
#: The lease's fields, in order; the times (``_ms``) are Redis ms: publish time, deadline, lease end (deadline +
#: sweeper grace, also the plan's score in INFLIGHT); the token lets a call made again find its own lease.
LEASE_FIELDS = ("published_ms", "deadline_ms", "end_ms", "token", "symbol", "decision")

# -- counter fields of COUNTERS ---------------------------------------------------------------------------------
#: "reason|<point>|<reason>" for an early point; "reason|publish_plan_post|<reason>|<path>[|le:<bound ms>]" for a
#: late record (the bucket on `ok` only). p28_observed_total, p28_heat_reason_total, p28_late_obs_recorded_total,
#: p28_late_obs_recovered_total and the histogram's buckets and count are all sums of these (metrics.py).
REASON = "reason"
BUCKET = "le:"
#: Sum of the late hits' wait (ms): the histogram's _sum.
WAIT_SUM_MS = "wait_sum_ms"
REFUSED_FIELD = "refused"  # "refused|<point>|<cause>": p28_observe_refused_total
#: Why an observe call refused to observe (p28_observe_refused_total{cause}): a bad plan id, symbol, decision or
#: observation point; Redis or the broker unavailable (an outage); Redis refusing the user (NOPERM, NOAUTH,
#: WRONGPASS: configuration); too many plans waiting for a worker to decide them (workers down); a call the
#: apply process held through a Redis outage and had to give up (beyond its outbox's bound, or still held when
#: the process exited).
REFUSAL_CAUSES = ("invalid_input", "unavailable", "config_error", "backlog", "given_up")
DROPPED = "dropped"  # p28_late_obs_dropped_total
LOST_FIELD = "lost"  # p28_late_obs_lost_total: a look found neither lease nor record for a young message
GAPS_FIELD = "gaps"  # p28_late_obs_redis_gaps_total
WAKE_RESYNCS = "wake_resyncs"
UNREPLICATED = "unreplicated"  # "unreplicated|<step>": p28_late_obs_unreplicated_total{step}
REPLICATED_STEPS = ("admit", "record")
FIELD_SEP = "|"

#: The task id of a plan: every look of it runs under this id (Flower shows one task per plan).
TASK_ID_PREFIX = "p28-late-"


def field(*parts: str) -> str:
    return FIELD_SEP.join(parts)


def dedupe_key(obs_point: str, plan_id: str) -> str:
    """The contract's dedupe key (for publish_plan_post: the plan's lease, then its marker)."""
    return f"{DEDUPE_PREFIX}{obs_point}:{plan_id}"


def task_id(plan_id: str) -> str:
    return TASK_ID_PREFIX + plan_id


def early_field(obs_point: str, reason: str) -> str:
    return field(REASON, obs_point, reason)


def refused_field(obs_point: str, cause: str) -> str:
    return field(REFUSED_FIELD, obs_point, cause)


def unreplicated_field(step: str) -> str:
    return field(UNREPLICATED, step)


def lua_constants() -> dict[str, object]:
    """What the Lua steps read from the table C (generated into every step by steps.py)."""
    return {
        "late_point": LATE_POINT, "sep": FIELD_SEP, "reason": REASON, "bucket": BUCKET,
        "wait_sum": WAIT_SUM_MS, "refused": REFUSED_FIELD, "dropped": DROPPED, "lost": LOST_FIELD,
        "gaps": GAPS_FIELD, "apply_component": APPLY_COMPONENT,
        "lease": LEASE, "recorded": RECORDED, "lost_marker": LOST, "refused_marker": REFUSED, "lease_sep": SEP,
        "lease_fields": LEASE_FIELDS,
        "stream_fields": STREAM_FIELDS, "late_fields": LATE_FIELDS, "heat_copied": [list(p) for p in HEAT_COPIED],
        "heat_debug": HEAT_DEBUG, "heat_checks": HEAT_CHECKS, "debug_drop": DEBUG_DROP_ORDER, "levels": HEAT_LEVELS,
        "actions": HEAT_ACTIONS, "max_copied": MAX_COPIED, **{f"path_{path}": path for path in RECORD_PATHS},
        **{reason: reason for reason in REASONS},
    }
