"""Recording: the lease is the exactly-once token, and Redis TIME is the clock (real Redis, no worker)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import redis

from observer_tasks.core import keys as K
from observer_tasks.core.settings import Settings
from observer_tasks.core.store import OBSERVE_STEPS, Store, lua_facts_source, redis_client, step_source

from .conftest import DATA_URL, inflight, late_entries, poll, stream_entries

HEAT = "quantum:harvest:heat:by_plan:"
LEASES = "quantum:p28:late_obs:leases"


def make_store(env: dict[str, str], **overrides: str) -> Store:
    return Store(Settings.from_env({**env, **overrides}), redis_client(DATA_URL, 1.0, "test"))


def counts(r: redis.Redis) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in r.hgetall("quantum:p28:counters").items()}


def shift_lease(r: redis.Redis, plan: str, by_ms: int) -> None:
    """Move a lease's publish time and deadline (as if admitted by_ms earlier, when negative)."""
    lease = json.loads(r.hget(LEASES, plan))  # type: ignore[arg-type]
    lease["published_ms"] += by_ms
    lease["deadline_ms"] += by_ms
    r.hset(LEASES, plan, json.dumps(lease))
    r.zadd("quantum:p28:late_obs:inflight", {plan: lease["deadline_ms"] + 5000})


def test_admission_stamps_redis_time(r: redis.Redis, env: dict[str, str]) -> None:
    store = make_store(env)
    sec, usec = r.time()
    admission = store.admit("p1", "BTCUSDT", "EXECUTE")
    assert admission.status == "admitted"
    assert abs(admission.published_ms - (sec * 1000 + usec // 1000)) < 1000
    assert admission.deadline_ms - admission.published_ms == 600
    assert json.loads(r.hget(LEASES, "p1")) == {  # type: ignore[arg-type]
        "symbol": "BTCUSDT", "apply_decision": "EXECUTE", "published_ms": admission.published_ms,
        "deadline_ms": admission.deadline_ms, "token": ""}
    assert store.admit("p1", "BTCUSDT", "EXECUTE").status == "duplicate"


def test_look_records_once_then_the_plan_is_gone(r: redis.Redis, env: dict[str, str]) -> None:
    store = make_store(env)
    store.admit("p1", "BTCUSDT", "EXECUTE")
    look = store.look("p1", 1, 0)
    assert look.status == "pending" and 0 < look.deadline_ms - look.now_ms <= 600
    r.hset(HEAT + "p1", mapping={"heat_level": "hot", "heat_action": "NONE"})
    recorded = store.look("p1", 2, 0)
    assert recorded[:5] == ("recorded", "ok", 0, 0, False) and recorded.wait_ms >= 0
    assert store.look("p1", 3, 0).status == "gone"
    assert store.wake(["p1"]) == {}
    assert store.finish("p1", "redis_error", {}).status == "gone"
    (entry,) = late_entries(r)
    assert (entry["heat_reason"], entry["polls"], entry["recorded_by"], entry["apply_decision"]) == (
        "ok", "2", "look", "EXECUTE")
    assert counts(r) == {"observed|publish_plan_post|1": 1, "reason|publish_plan_post|ok": 1, "recorded|look": 1}
    assert inflight(r) == 0 and r.hlen(LEASES) == 0


def test_wake_records_leased_plans_only(r: redis.Redis, env: dict[str, str]) -> None:
    store = make_store(env)
    for plan in ("a", "b", "c"):
        store.admit(plan, "ETHUSDT", "SKIP")
    r.hset(HEAT + "a", "heat_level", "warm")
    r.sadd(HEAT + "b", "x")  # unreadable
    r.hset(HEAT + "free", "heat_level", "warm")  # not under observation
    woken = store.wake(["a", "b", "c", "free"])  # c: no heat hash yet
    assert {p: o.reason for p, o in woken.items()} == {"a": "ok", "b": "parse_error"}
    assert store.wake(["a", "b"]) == {}
    assert sorted((e["plan_id"], e["heat_reason"], e["recorded_by"]) for e in late_entries(r)) == [
        ("a", "ok", "wake"), ("b", "parse_error", "wake")]
    assert inflight(r) == 1 and counts(r)["recorded|wake"] == 2


def test_redelivery_after_the_dedupe_ttl_writes_nothing(r: redis.Redis, env: dict[str, str]) -> None:
    store = make_store(env, P28_DEDUPE_TTL_SEC="1")
    store.admit("p1", "BTCUSDT", "")
    r.hset(HEAT + "p1", "heat_level", "hot")
    assert {p: o.reason for p, o in store.wake(["p1"]).items()} == {"p1": "ok"}
    poll(lambda: not r.exists("quantum:dedupe:p28:publish_plan_post:p1"), timeout=5, what="dedupe key expired")
    before = counts(r)
    assert store.look("p1", 1, 0).status == "gone"  # a late, redelivered message
    assert store.finish("p1", "redis_error", {}).status == "gone"
    assert store.wake(["p1"]) == {}
    assert len(late_entries(r)) == 1 and counts(r) == before


def test_a_late_look_records_timeout_with_the_window_as_wait(r: redis.Redis, env: dict[str, str]) -> None:
    store = make_store(env)
    store.admit("quiet", "BTCUSDT", "")
    store.admit("heat-late", "BTCUSDT", "")
    shift_lease(r, "quiet", -3000)  # its deadline passed 2.4 s ago
    shift_lease(r, "heat-late", -3000)
    r.hset(HEAT + "heat-late", "heat_level", "hot")  # written after the deadline
    assert store.look("quiet", 4, 0).reason == "timeout"
    assert store.wake(["heat-late"])["heat-late"].reason == "timeout"
    entries = {e["plan_id"]: e for e in late_entries(r)}
    for plan in ("quiet", "heat-late"):
        assert (entries[plan]["heat_reason"], entries[plan]["wait_ms"]) == ("timeout", "600")
        assert json.loads(entries[plan]["debug_json"])["late_ms"] >= 2000
    assert json.loads(entries["heat-late"]["debug_json"])["heat_after_deadline"] is True


def test_debug_json_is_capped(r: redis.Redis, env: dict[str, str]) -> None:
    store = make_store(env, P28_MAX_DEBUG_CHARS="50")
    store.admit("p1", "BTCUSDT", "")
    r.hset(HEAT + "p1", mapping={"heat_level": "hot", "debug_json": "x" * 1000})
    store.wake(["p1"])
    (entry,) = stream_entries(r)
    assert len(entry["debug_json"]) <= 50 and json.loads(entry["debug_json"])["truncated"] is True


def test_sweep_records_overdue_leases_once(r: redis.Redis, env: dict[str, str]) -> None:
    store = make_store(env)
    store.admit("lost", "ETHUSDT", "SKIP")
    store.admit("unsent", "ETHUSDT", "SKIP")
    store.admit("live", "ETHUSDT", "SKIP")
    shift_lease(r, "lost", -60_000)
    shift_lease(r, "unsent", -60_000)
    store.note_unsent(["unsent"], "publisher queue full")
    r.hset(LEASES, "junk", "not json")
    r.zadd("quantum:p28:late_obs:inflight", {"junk": 1})
    now, recorded, freed, outcomes, skipped = store.sweep([])
    assert (recorded, freed, skipped) == (2, ["junk"], {})
    assert store.sweep([])[1:] == (0, [], {}, {})
    entries = {e["plan_id"]: e for e in late_entries(r)}
    assert sorted(entries) == ["lost", "unsent"]
    assert outcomes == {p: (e["heat_reason"], int(e["wait_ms"])) for p, e in entries.items()}
    assert (entries["lost"]["heat_reason"], entries["lost"]["recorded_by"], entries["lost"]["wait_ms"]) == (
        "timeout", "sweep", "600")
    # Its first message never reached the broker: an outage, recorded as missing, not timeout.
    assert entries["unsent"]["heat_reason"] == "missing"
    assert json.loads(entries["unsent"]["debug_json"])["unsent"] == "publisher queue full"
    assert counts(r)["recovered"] == 2 and inflight(r) == 1
    sec, _ = r.time()
    assert abs(now / 1000 - sec) < 2


def test_sweep_records_redis_error_when_it_saw_an_outage(r: redis.Redis, env: dict[str, str]) -> None:
    store = make_store(env)
    store.admit("during", "BTCUSDT", "")
    store.admit("before", "BTCUSDT", "")
    shift_lease(r, "during", -10_000)
    shift_lease(r, "before", -30_000)
    lease = json.loads(r.hget(LEASES, "during"))  # type: ignore[arg-type]
    outage = (lease["published_ms"] + 100, lease["published_ms"] + 300)
    assert store.sweep([outage]).recorded == 2
    assert {e["plan_id"]: e["heat_reason"] for e in late_entries(r)} == {"during": "redis_error", "before": "timeout"}


def test_lua_scripts_are_loadable_with_redis_cli(r: redis.Redis) -> None:
    script = Path(__file__).parent.parent / "observer_tasks" / "core" / "redis_scripts" / "admit.lua"
    out = subprocess.run(["redis-cli", "-h", r.connection_pool.connection_kwargs["host"],
                          "-p", str(r.connection_pool.connection_kwargs["port"]),
                          "-n", DATA_URL.rsplit("/", 1)[1], "--eval", str(script),
                          "quantum:p28:late_obs:inflight", "quantum:p28:late_obs:leases", "quantum:p28:counters",
                          "quantum:dedupe:p28:publish_plan_post:cli", ",", "cli", "600", "5000", "200", "BTCUSDT", "",
                          "0", "", "dropped"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[0] == "admitted"
    assert inflight(r) == 1


def test_a_lease_lost_unrecorded_is_counted_once(r: redis.Redis, env: dict[str, str]) -> None:
    """A failover to a replica that never received an admission leaves the message without its lease and
    without a record: its look counts the plan as lost, once, and writes no entry."""
    store = make_store(env)
    admission = store.admit("p1", "BTCUSDT", "EXECUTE")
    r.hdel(LEASES, "p1")  # what the promoted replica never had
    r.zrem("quantum:p28:late_obs:inflight", "p1")
    assert store.look("p1", 1, 0, admission.deadline_ms).status == "lost"
    assert store.look("p1", 1, 0, admission.deadline_ms).status == "gone"  # a redelivery counts nothing
    # A recorded plan, and a message older than the dedupe window (its record's key may be gone): gone.
    recorded = store.admit("p2", "BTCUSDT", "EXECUTE")
    r.hset(HEAT + "p2", "heat_level", "hot")
    assert store.look("p2", 1, 0, recorded.deadline_ms).status == "recorded"
    assert store.look("p2", 1, 0, recorded.deadline_ms).status == "gone"
    assert store.look("p3", 1, 0, recorded.deadline_ms - 601_000).status == "gone"
    assert counts(r)["lost"] == 1
    assert [e["plan_id"] for e in late_entries(r)] == ["p2"]


def test_replica_wait_counts_steps_no_replica_acknowledged(r: redis.Redis, env: dict[str, str]) -> None:
    """The tests' Redis has no replica: with P28_REPLICA_WAIT_MS every admission and record waits that long,
    stands, and is counted as unreplicated."""
    store = make_store(env, P28_REPLICA_WAIT_MS="5")
    admission = store.admit("p1", "BTCUSDT", "EXECUTE")
    assert admission.status == "admitted"
    r.hset(HEAT + "p1", "heat_level", "hot")
    assert store.look("p1", 1, 0, admission.deadline_ms).status == "recorded"
    assert (counts(r)["unreplicated|admit"], counts(r)["unreplicated|record"]) == (1, 1)
    assert [e["plan_id"] for e in late_entries(r)] == ["p1"]


SCRIPTS = Path(__file__).parent.parent / "observer_tasks" / "core" / "redis_scripts"


def test_the_names_keys_py_owns_are_not_repeated_in_lua() -> None:
    """Counter fields, observation points, record paths, the dedupe prefix and key names reach the Lua steps
    only from keys.py (the generated table F, ARGV, KEYS): a literal copy in a script would drift."""
    facts = K.lua_facts()
    # (admit.lua returns the status 'dropped' and counts it under ARGV[7], K.DROPPED; look.lua returns 'lost' and
    # counts it under F.lost: reply words, not counter fields.)
    owned = [K.OBS_EARLY, K.OBS_LATE, K.DEDUPE_PREFIX, "quantum:", f"'{K.RECOVERED}'", f"'{K.WAKE_RESYNCS}'",
             K.NOTE_FAILED, *(f"'{name}{K.FIELD_SEP}" for name in (K.OBSERVED, K.REASON, K.REFUSED, K.RECORDED)),
             *(f"'{p}'" for p in K.RECORD_PATHS), f"'{K.HIST_BUCKET_PREFIX}", f"'{K.HIST_COUNT}'", f"'{K.HIST_SUM}'"]
    for script in SCRIPTS.glob("*.lua"):
        code = "\n".join(line.split("--", 1)[0] for line in script.read_text().splitlines())  # comments aside
        assert not [name for name in owned if name in code], script.name
        used = set(re.findall(r"\bF\.([a-z_]+)", code))
        assert used <= set(facts), (script.name, used - set(facts))
    for name in OBSERVE_STEPS:
        assert step_source(name).startswith(lua_facts_source())


def test_counter_fields_written_are_the_ones_metrics_read(r: redis.Redis, env: dict[str, str]) -> None:
    store = make_store(env, P28_LATE_OBS_MAX_INFLIGHT="3")
    store.observe_early("e1", "BTCUSDT", "")
    for plan in ("hit", "late", "lost"):
        store.admit(plan, "BTCUSDT", "")
    assert store.admit("over", "BTCUSDT", "").status == "dropped"
    r.hset(HEAT + "hit", "heat_level", "hot")
    store.wake(["hit"])
    shift_lease(r, "late", -3000)
    store.look("late", 1, 0)
    shift_lease(r, "lost", -60_000)
    store.sweep([])
    known = {K.DROPPED, K.RECOVERED, *(K.Keys.recorded_field(p) for p in K.RECORD_PATHS)}
    for point in K.OBS_POINTS:
        known |= {K.Keys.observed_field(point, f) for f in "01"} | {K.Keys.reason_field(point, x) for x in K.REASONS}
    assert set(counts(r)) <= known and len(counts(r)) == 11
    hist = {k.decode() for k in r.hkeys(K.HEAT_WAIT)}
    assert {K.HIST_COUNT, K.HIST_SUM} < hist and all(
        k in (K.HIST_COUNT, K.HIST_SUM) or k.startswith(K.HIST_BUCKET_PREFIX) for k in hist)
