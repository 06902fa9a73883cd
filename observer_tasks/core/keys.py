"""Every Redis key and stream name, built in one place from the settings.

Plan ids become parts of keys, so they are checked here: an id that could
reach a key outside the configured prefixes (``*``, ``:``, spaces, control
characters, non-ASCII) or that is absurdly long is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .settings import Settings

OBS_EARLY = "create_apply_plan"
OBS_LATE = "publish_plan_post"
OBS_POINTS = (OBS_EARLY, OBS_LATE)
#: The closed set of reasons (metrics cardinality depends on it).
REASONS = ("ok", "missing", "timeout", "redis_error", "parse_error")
#: Why an observe call refused to observe (the p28_observe_refused_total causes): a bad plan id or symbol,
#: Redis or the broker unavailable (an outage), Redis refusing the user (NOPERM, NOAUTH, WRONGPASS: configuration).
REFUSAL_CAUSES = ("invalid_input", "unavailable", "config_error")

PLAN_ID_MAX = 128
_PLAN_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.\-]{{0,{PLAN_ID_MAX - 1}}}")

COUNTERS = "quantum:p28:counters"
INFLIGHT = "quantum:p28:late_obs:inflight"
LEASES = "quantum:p28:late_obs:leases"
HEAT_WAIT = "quantum:p28:late_obs:heat_wait"
#: The plans' notes, read into debug_json by whoever records the plan: plan -> why its first message was never
#: sent (the producer's hand-off failed; the sweeper then records it as missing), NOTE_FAILED + plan -> the last
#: error of a step that could not record it.
UNSENT = "quantum:p28:late_obs:unsent"
#: Exists (PX) while some worker's wake listener is connected.
WAKE_OK = "quantum:p28:late_obs:wake_ok"
#: Exists (PX) while some live worker's wake listener is not connected: the chain polls at POLL_MS.
WAKE_DEGRADED = "quantum:p28:late_obs:wake_degraded"
#: Worker nodename -> JSON heartbeat (seen_ms on Redis's clock, wake state, last push, resyncs).
WORKERS = "quantum:p28:workers"
#: How a publish_plan_post entry was recorded (p28_late_obs_recorded_total{path}).
RECORD_PATHS = ("look", "wake", "sweep")
#: The dedupe key of a plan and observation point is DEDUPE_PREFIX + "<obs_point>:<plan_id>" (the contract's name).
DEDUPE_PREFIX = "quantum:dedupe:p28:"

# Fields of the COUNTERS hash: "<kind>|<obs_point>|<label>" for the labelled families, plain names otherwise.
# metrics.py reads them, the producer and the Lua steps write them; Lua gets them from lua_facts().
FIELD_SEP = "|"
OBSERVED, REASON, REFUSED, RECORDED = "observed", "reason", "refused", "recorded"
DROPPED = "dropped"  # p28_late_obs_dropped_total
RECOVERED = "recovered"  # p28_late_obs_recovered_total: recorded by the sweeper
WAKE_RESYNCS = "wake_resyncs"
LOST = "lost"  # p28_late_obs_lost_total: a look found neither lease nor record for a young message
UNREPLICATED = "unreplicated"  # "unreplicated|<step>": p28_late_obs_unreplicated_total{step}
REPLICATED_STEPS = ("admit", "record")
# Fields of the HEAT_WAIT hash: "le:<bound ms>" per bucket (not cumulative), the count and the sum (s).
HIST_BUCKET_PREFIX, HIST_COUNT, HIST_SUM = "le:", "count", "sum"
#: UNSENT's field NOTE_FAILED + plan: the last error of a step that could not record the plan (the lease stays);
#: whoever records the plan later puts it in debug_json as "failed", beside "unsent".
NOTE_FAILED = "failed|"


class InvalidInput(ValueError):
    """A plan id, symbol or task argument the observer refuses."""


def valid_plan_id(plan_id: object) -> bool:
    return isinstance(plan_id, str) and _PLAN_ID.fullmatch(plan_id) is not None


def check_plan_id(plan_id: object) -> str:
    if not isinstance(plan_id, str) or not _PLAN_ID.fullmatch(plan_id):
        shown = repr(plan_id)
        raise InvalidInput(f"plan_id {shown[:60]}{'...' if len(shown) > 60 else ''} is not 1-{PLAN_ID_MAX} "
                           "characters of A-Z a-z 0-9 _ . - (starting with a letter or digit)")
    return plan_id


@dataclass(frozen=True)
class Keys:
    stream: str
    heat_prefix: str

    @classmethod
    def from_settings(cls, settings: Settings) -> Keys:
        return cls(stream=settings.obs_stream, heat_prefix=settings.heat_lookup_prefix)

    def heat(self, plan_id: str) -> str:
        return self.heat_prefix + check_plan_id(plan_id)

    def plan_of_heat_key(self, key: bytes | str) -> str | None:
        """The plan id of a heat key, or None for a key that is not one (another prefix, a bad id)."""
        text = key.decode(errors="replace") if isinstance(key, bytes) else key
        plan_id = text[len(self.heat_prefix):] if text.startswith(self.heat_prefix) else None
        return plan_id if valid_plan_id(plan_id) else None

    @staticmethod
    def dedupe(obs_point: str, plan_id: str) -> str:
        return f"{DEDUPE_PREFIX}{obs_point}:{check_plan_id(plan_id)}"

    @staticmethod
    def observed_field(obs_point: str, heat_found: str) -> str:
        return FIELD_SEP.join((OBSERVED, obs_point, heat_found))

    @staticmethod
    def reason_field(obs_point: str, reason: str) -> str:
        return FIELD_SEP.join((REASON, obs_point, reason))

    @staticmethod
    def refused_field(obs_point: str, cause: str) -> str:
        return FIELD_SEP.join((REFUSED, obs_point, cause))

    @staticmethod
    def recorded_field(path: str) -> str:
        return FIELD_SEP.join((RECORDED, path))

    @staticmethod
    def unreplicated_field(step: str) -> str:
        return FIELD_SEP.join((UNREPLICATED, step))


def lua_facts() -> dict[str, str]:
    """The names above that the Lua steps write, as store.py hands them to every step (the Lua table F)."""
    return {
        "obs_early": OBS_EARLY, "obs_late": OBS_LATE, "sep": FIELD_SEP,
        "observed": OBSERVED, "reason": REASON, "recorded": RECORDED, "recovered": RECOVERED, "lost": LOST,
        "path_look": RECORD_PATHS[0], "path_wake": RECORD_PATHS[1], "path_sweep": RECORD_PATHS[2],
        "hist_bucket": HIST_BUCKET_PREFIX, "hist_count": HIST_COUNT, "hist_sum": HIST_SUM,
        "note_failed": NOTE_FAILED,
    }
