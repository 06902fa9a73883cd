"""The ledger's steps against a real Redis (no worker): the lease is the exactly-once token, Redis TIME the clock,
the reasons tell timing from infrastructure, and a step that fails leaves nothing behind."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import redis

from observer_tasks.core import contract as C
from observer_tasks.core.connections import redis_client
from observer_tasks.core.ledger import GONE, LOST, Ledger, Pending, Recorded
from observer_tasks.core.settings import LATE_POINT, Settings
from observer_tasks.core.steps import STEPS, prologue

from .conftest import DATA_URL, HEAT, counters, inflight, late_entries, lease, move_lease, poll, stream_entries

SCRIPTS = Path(__file__).parent.parent / "observer_tasks" / "core" / "redis_scripts"


def make_ledger(env: dict[str, str], **overrides: str) -> Ledger:
    return Ledger(Settings.from_env({**env, **overrides}), redis_client(DATA_URL, 1.0, "test"))


def redis_ms(r: redis.Redis) -> int:
    sec, usec = r.time()
    return sec * 1000 + usec // 1000


def test_admission_stamps_redis_time(r: redis.Redis, env: dict[str, str]) -> None:
    ledger = make_ledger(env)
    now = redis_ms(r)
    admission = ledger.admit("p1", "BTCUSDT", "EXECUTE", "t1")
    assert admission.status == "admitted"
    assert abs(admission.published_ms - now) < 1000
    assert admission.deadline_ms - admission.published_ms == 600
    assert lease(r, "p1") == {"published_ms": admission.published_ms, "deadline_ms": admission.deadline_ms,
                              "end_ms": admission.deadline_ms + ledger.settings.sweep_grace_ms, "token": "t1",
                              "symbol": "BTCUSDT", "decision": "EXECUTE"}
    assert r.zscore(C.INFLIGHT, "p1") == admission.deadline_ms + ledger.settings.sweep_grace_ms
    assert ledger.admit("p1", "BTCUSDT", "EXECUTE", "t2").status == "duplicate"
    # The same call made again (its reply was lost) finds its own lease, with its times.
    assert ledger.admit("p1", "BTCUSDT", "EXECUTE", "t1", age_ms=400)[:3] == ("kept", admission.published_ms,
                                                                              admission.deadline_ms)


def test_look_records_once_then_the_plan_is_gone(r: redis.Redis, env: dict[str, str]) -> None:
    ledger = make_ledger(env)
    admission = ledger.admit("p1", "BTCUSDT", "EXECUTE")
    look = ledger.look("p1", 1, 0, admission.deadline_ms)
    assert isinstance(look, Pending) and 0 < look.deadline_ms - look.now_ms <= 600
    r.hset(HEAT + "p1", mapping={"heat_level": "hot", "heat_action": "NONE"})
    recorded = ledger.look("p1", 2, 0, admission.deadline_ms)
    assert isinstance(recorded, Recorded) and recorded.reason == "ok" and recorded.wait_ms >= 0
    assert ledger.look("p1", 3, 0, admission.deadline_ms) == GONE
    assert ledger.wake(["p1"]).recorded == {}
    assert ledger.finish("p1", "redis_error", 3) == GONE
    (entry,) = late_entries(r)
    assert (entry["heat_reason"], entry["polls"], entry["recorded_by"], entry["apply_decision"]) == (
        "ok", "2", "look", "EXECUTE")
    assert {k: v for k, v in counters(r).items() if v} == {
        ("p28_observed", LATE_POINT, "1"): 1, ("p28_heat_reason", LATE_POINT, "ok"): 1,
        ("p28_late_obs_recorded", "look"): 1, ("p28_late_obs_heat_wait_seconds_count",): 1}
    assert inflight(r) == 0 and r.get(C.dedupe_key(LATE_POINT, "p1")) == b"R|ok"


def test_wake_records_leased_plans_only(r: redis.Redis, env: dict[str, str]) -> None:
    ledger = make_ledger(env)
    for plan in ("a", "b", "c"):
        ledger.admit(plan, "ETHUSDT", "SKIP")
    r.hset(HEAT + "a", "heat_level", "warm")
    r.sadd(HEAT + "b", "x")  # unreadable
    r.hset(HEAT + "free", "heat_level", "warm")  # not under observation
    woken = ledger.wake(["a", "b", "c", "free"])  # c: no heat hash yet
    assert {p: o.reason for p, o in woken.recorded.items()} == {"a": "ok", "b": "parse_error"}
    assert ledger.wake(["a", "b"]).recorded == {}
    assert sorted((e["plan_id"], e["heat_reason"], e["recorded_by"]) for e in late_entries(r)) == [
        ("a", "ok", "wake"), ("b", "parse_error", "wake")]
    assert inflight(r) == 1 and counters(r)("p28_late_obs_recorded", "wake") == 2


def test_redelivery_after_the_dedupe_ttl_writes_nothing(r: redis.Redis, env: dict[str, str]) -> None:
    ledger = make_ledger(env, P28_DEDUPE_TTL_SEC="1")
    admission = ledger.admit("p1", "BTCUSDT", "")
    r.hset(HEAT + "p1", "heat_level", "hot")
    assert {p: o.reason for p, o in ledger.wake(["p1"]).recorded.items()} == {"p1": "ok"}
    poll(lambda: not r.exists(C.dedupe_key(LATE_POINT, "p1")), timeout=5, what="dedupe key expired")
    before = counters(r)
    assert ledger.look("p1", 1, 0, admission.deadline_ms - 2000) == GONE  # a late, redelivered message
    assert ledger.finish("p1", "redis_error", 1) == GONE
    assert ledger.wake(["p1"]).recorded == {}
    assert len(late_entries(r)) == 1 and counters(r) == before


def test_a_late_look_records_timeout_with_the_window_as_wait(r: redis.Redis, env: dict[str, str]) -> None:
    ledger = make_ledger(env)
    for plan in ("quiet", "heat-late", "heat-in-time"):
        ledger.admit(plan, "BTCUSDT", "")
        move_lease(r, plan, 3000)  # its deadline passed 2.4 s ago
    r.hset(HEAT + "heat-late", "heat_level", "hot")  # written after the deadline, unstamped
    deadline = lease(r, "heat-in-time")["deadline_ms"]  # type: ignore[index]
    # Written before the deadline (HeatBridge's Redis time says so), found only now: in time, so ok.
    r.hset(HEAT + "heat-in-time", mapping={"heat_level": "hot", "ts_epoch": f"{(deadline - 200) / 1000:.3f}"})
    assert ledger.look("quiet", 4, 0, 0).reason == "timeout"  # type: ignore[union-attr]
    assert ledger.wake(["heat-late"]).recorded["heat-late"].reason == "timeout"
    assert ledger.wake(["heat-in-time"]).recorded["heat-in-time"] == Recorded("ok", 400)
    entries = {e["plan_id"]: e for e in late_entries(r)}
    for plan in ("quiet", "heat-late"):
        assert (entries[plan]["heat_reason"], entries[plan]["wait_ms"]) == ("timeout", "600")
        assert json.loads(entries[plan]["debug_json"])["late_ms"] >= 2000
    assert json.loads(entries["heat-late"]["debug_json"])["heat_after_deadline"] is True
    assert json.loads(entries["heat-in-time"]["debug_json"])["found_late"] is True
    assert entries["heat-in-time"]["heat_level"] == "hot"


def test_a_window_that_overlapped_a_gap_is_a_redis_error_unless_heat_proves_ok(r: redis.Redis,
                                                                               env: dict[str, str]) -> None:
    """The workers record a Redis outage as a gap; a plan whose window overlapped one, with no heat to prove an
    answer, is redis_error (an infrastructure problem), never a timeout."""
    ledger = make_ledger(env)
    for plan in ("during", "before", "proved", "chain-failed"):
        ledger.admit(plan, "BTCUSDT", "")
        move_lease(r, plan, 10_000)
    move_lease(r, "before", 20_000)
    during = lease(r, "during")
    assert during is not None
    gap_start = during["published_ms"] + 100
    ledger.heartbeat("w@test", {"wake": "off"}, "off", gap_start_ms=gap_start)  # the gap ends at Redis now
    r.hset(HEAT + "proved", mapping={"heat_level": "hot", "ts_epoch": f"{during['published_ms'] / 1000 + 0.2:.3f}"})
    assert ledger.look("during", 9, 0, 0).reason == "redis_error"  # type: ignore[union-attr]
    assert ledger.look("before", 9, 0, 0).reason == "timeout"  # type: ignore[union-attr]
    assert ledger.look("proved", 9, 0, 0).reason == "ok"  # type: ignore[union-attr]
    r.delete(C.GAPS)
    assert ledger.look("chain-failed", 9, 1, 0).reason == "redis_error"  # type: ignore[union-attr]
    entries = {e["plan_id"]: json.loads(e["debug_json"]) for e in late_entries(r)}
    assert entries["during"]["gap"].startswith(f"{gap_start}-")
    assert counters(r)("p28_late_obs_redis_gaps") == 1


def test_heat_written_before_the_admission_is_recorded_by_it(r: redis.Redis, env: dict[str, str]) -> None:
    ledger = make_ledger(env)
    r.hset(HEAT + "first", mapping={"heat_level": "warm", "heat_score": "0.5"})
    admission = ledger.admit("first", "BTCUSDT", "EXECUTE", "t")
    assert admission.status == "recorded" and admission.reason == "ok"
    (entry,) = late_entries(r)
    assert (entry["recorded_by"], entry["wait_ms"], entry["heat_level"]) == ("admit", "0", "warm")
    assert inflight(r) == 0 and ledger.admit("first", "BTCUSDT", "EXECUTE", "t").status == "duplicate"


def test_a_call_deferred_past_its_window_is_recorded_as_redis_error(r: redis.Redis, env: dict[str, str]) -> None:
    ledger = make_ledger(env)
    admission = ledger.admit("held", "BTCUSDT", "SKIP", "t", age_ms=5000)
    assert admission.status == "recorded" and admission.reason == "redis_error"
    (entry,) = late_entries(r)
    debug = json.loads(entry["debug_json"])
    assert (entry["wait_ms"], debug["deferred_ms"], entry["recorded_by"]) == ("600", 5000, "admit")
    assert "could not reach Redis" in debug["cause"] and inflight(r) == 0


def test_drops_and_the_backlog_of_plans_nobody_decides(r: redis.Redis, env: dict[str, str]) -> None:
    """MAX_INFLIGHT live leases drop a plan; MAX_INFLIGHT more waiting past their lease (no worker decides
    them) refuse one as backlog; either leaves nothing behind."""
    ledger = make_ledger(env, P28_LATE_OBS_MAX_INFLIGHT="2")
    ledger.admit("a", "X", "")
    ledger.admit("b", "X", "")
    assert ledger.admit("c", "X", "").status == "dropped"
    move_lease(r, "a", 60_000)  # a waits past its lease: it holds no slot
    assert ledger.admit("c", "X", "").status == "admitted"
    assert ledger.admit("d", "X", "").status == "dropped"  # b and c live
    move_lease(r, "b", 60_000)
    move_lease(r, "c", 60_000)
    assert ledger.admit("d", "X", "").status == "backlog"  # a, b and c wait for a worker
    assert counters(r)("p28_late_obs_dropped") == 2
    assert counters(r)("p28_observe_refused", LATE_POINT, "backlog") == 1
    assert lease(r, "d") is None and not r.exists(C.dedupe_key(LATE_POINT, "d")) and inflight(r) == 3


def test_debug_json_is_capped(r: redis.Redis, env: dict[str, str]) -> None:
    ledger = make_ledger(env, P28_MAX_DEBUG_CHARS="50")
    ledger.admit("p1", "BTCUSDT", "")
    r.hset(HEAT + "p1", mapping={"heat_level": "hot", "debug_json": "x" * 1000})
    ledger.wake(["p1"])
    (entry,) = stream_entries(r)
    assert len(entry["debug_json"]) <= 50 and json.loads(entry["debug_json"])["truncated"] is True


def test_sweep_records_overdue_leases_once(r: redis.Redis, env: dict[str, str]) -> None:
    ledger = make_ledger(env)
    for plan in ("lost", "unsent", "live", "hit"):
        ledger.admit(plan, "ETHUSDT", "SKIP")
    for plan in ("lost", "unsent", "hit"):
        move_lease(r, plan, 60_000)
    ledger.note({"unsent": "publisher queue full"})
    r.hset(HEAT + "hit", mapping={"heat_level": "cold", "ts_epoch": f"{lease(r, 'hit')['published_ms'] / 1000:.3f}"})  # type: ignore[index]
    r.set(C.dedupe_key(LATE_POINT, "junk"), "not a lease")
    r.zadd(C.INFLIGHT, {"junk": 1, "not a plan id": 1})
    swept = ledger.sweep()
    assert (sorted(swept.recorded), sorted(swept.freed), swept.skipped) == (
        ["hit", "lost", "unsent"], ["junk", "not a plan id"], {})
    assert ledger.sweep()[:3] == ({}, {}, [])
    entries = {e["plan_id"]: e for e in late_entries(r)}
    assert swept.recorded == {p: (e["heat_reason"], int(e["wait_ms"])) for p, e in entries.items()}
    assert (entries["lost"]["heat_reason"], entries["lost"]["recorded_by"], entries["lost"]["wait_ms"]) == (
        "timeout", "sweep", "600")
    # Its first message never reached the broker: an outage, recorded as missing, not timeout.
    assert entries["unsent"]["heat_reason"] == "missing"
    assert json.loads(entries["unsent"]["debug_json"])["unsent"] == "publisher queue full"
    # Nobody looked in time, but the heat proves it was there: ok, decided by the sweeper.
    assert (entries["hit"]["heat_reason"], entries["hit"]["wait_ms"]) == ("ok", "0")
    assert counters(r)("p28_late_obs_recovered") == 3 and inflight(r) == 1
    assert abs(swept.now_ms - redis_ms(r)) < 2000


def test_a_step_that_fails_leaves_nothing_behind(r: redis.Redis, env: dict[str, str]) -> None:
    """Redis does not roll a script back: a step that fails after its first write undoes what it wrote."""
    ledger = make_ledger(env)
    admission = ledger.admit("p1", "BTCUSDT", "")
    r.hset(C.COUNTERS, C.WAIT_SUM_MS, "not a number")  # every hit adds its wait there: the step's last write
    r.hset(HEAT + "p1", "heat_level", "hot")
    before = (r.xlen(ledger.settings.obs_stream), r.get(C.dedupe_key(LATE_POINT, "p1")), inflight(r))
    try:
        ledger.look("p1", 1, 0, admission.deadline_ms)
    except redis.ResponseError as exc:
        assert "not an integer" in str(exc)
    else:
        raise AssertionError("the look should have failed on the corrupt counter")
    assert (r.xlen(ledger.settings.obs_stream), r.get(C.dedupe_key(LATE_POINT, "p1")), inflight(r)) == before
    r.hdel(C.COUNTERS, C.WAIT_SUM_MS)
    assert ledger.look("p1", 2, 0, admission.deadline_ms).reason == "ok"  # type: ignore[union-attr]


def test_composed_steps_are_loadable_with_redis_cli(r: redis.Redis, tmp_path: Path) -> None:
    """A step's whole text (its generated prologue, the library, its file) runs under redis-cli --eval, with
    its KEYS and ARGV in the declared order (python -m observer_tasks.core.steps admit prints both)."""
    shown = subprocess.run([sys.executable, "-m", "observer_tasks.core.steps", "admit"], capture_output=True,
                           text=True, check=True).stdout
    script = tmp_path / "admit.lua"
    script.write_text(shown)
    kw = r.connection_pool.connection_kwargs
    keys = [C.INFLIGHT, C.dedupe_key(LATE_POINT, "cli"), HEAT + "cli", Settings().obs_stream, C.COUNTERS, C.GAPS]
    args = ["cli", "BTCUSDT", "", "", "0", "600", "1000", "200", "200", "600", "10000", "400", "50", "5,10", "{}"]
    assert [s.split(":")[0] for s in STEPS["admit"].keys] == ["inflight", "lease", "heat", "stream", "counters", "gaps"]
    out = subprocess.run(["redis-cli", "-h", kw["host"], "-p", str(kw["port"]), "-n", DATA_URL.rsplit("/", 1)[1],
                          "--eval", str(script), *keys, ",", *args], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[0] == "admitted"
    assert inflight(r) == 1


def test_a_lease_lost_unrecorded_is_counted_once(r: redis.Redis, env: dict[str, str]) -> None:
    """A failover to a replica that never received an admission leaves the message without its lease and
    without a record: its look counts the plan as lost, once, and writes no entry."""
    ledger = make_ledger(env)
    admission = ledger.admit("p1", "BTCUSDT", "EXECUTE", "t1")
    r.delete(C.dedupe_key(LATE_POINT, "p1"))  # what the promoted replica never had
    r.zrem(C.INFLIGHT, "p1")
    assert ledger.look("p1", 1, 0, admission.deadline_ms) == LOST
    assert ledger.look("p1", 1, 0, admission.deadline_ms) == GONE  # a redelivery counts nothing
    # The apply process admits it again (its recheck after a failover): a new lease, not a duplicate.
    assert ledger.admit("p1", "BTCUSDT", "EXECUTE", "t1").status == "admitted"
    # A recorded plan, and a message older than the dedupe window (its record's key may be gone): gone.
    recorded = ledger.admit("p2", "BTCUSDT", "EXECUTE")
    r.hset(HEAT + "p2", "heat_level", "hot")
    assert isinstance(ledger.look("p2", 1, 0, recorded.deadline_ms), Recorded)
    assert ledger.look("p2", 1, 0, recorded.deadline_ms) == GONE
    assert ledger.look("p3", 1, 0, recorded.deadline_ms - 601_000) == GONE
    assert counters(r)("p28_late_obs_lost") == 1
    assert [e["plan_id"] for e in late_entries(r)] == ["p2"]


def test_replica_wait_counts_records_no_replica_acknowledged(r: redis.Redis, env: dict[str, str]) -> None:
    """The tests' Redis has no replica: with P28_REPLICA_WAIT_MS a record waits that long, stands, and is
    counted as unreplicated (the admissions' wait is the apply process's outbox's: test_outbox.py)."""
    ledger = make_ledger(env, P28_REPLICA_WAIT_MS="5")
    admission = ledger.admit("p1", "BTCUSDT", "EXECUTE")
    assert admission.status == "admitted"
    r.hset(HEAT + "p1", "heat_level", "hot")
    assert isinstance(ledger.look("p1", 1, 0, admission.deadline_ms), Recorded)
    assert not ledger.replicated_after_write()
    assert counters(r)("p28_late_obs_unreplicated", "record") == 1
    assert [e["plan_id"] for e in late_entries(r)] == ["p1"]


def test_no_hand_written_lua_indexes_keys_or_argv_or_repeats_a_contract_name() -> None:
    """Every step reads its keys and arguments by name (the generated prologue) and the contract's names from
    the generated table C: a literal copy in a script would drift."""
    owned = [LATE_POINT, C.DEDUPE_PREFIX, "quantum:", C.WAIT_SUM_MS, C.BUCKET,
             *(f"'{name}{C.FIELD_SEP}" for name in (C.REASON, C.REFUSED_FIELD, C.UNREPLICATED)),
             *(f"'{p}'" for p in C.RECORD_PATHS), *(f"'{f}'" for f in (*C.STREAM_FIELDS, *C.LATE_FIELDS)),
             *(f"'{reason}'" for reason in C.REASONS)]
    for script in SCRIPTS.glob("*.lua"):
        code = "\n".join(line.split("--", 1)[0] for line in script.read_text().splitlines())  # comments aside
        assert not re.search(r"\b(KEYS|ARGV)\s*\[", code), script.name
        assert not [name for name in owned if name in code], script.name
    for step in STEPS.values():
        if step.name != "probe":
            assert step.source().startswith(prologue(step))


def test_counter_fields_written_are_the_ones_metrics_read(r: redis.Redis, env: dict[str, str]) -> None:
    ledger = make_ledger(env, P28_LATE_OBS_MAX_INFLIGHT="3")
    ledger.early("e1", "BTCUSDT", "", "create_apply_plan")
    for plan in ("hit", "late", "lost"):
        ledger.admit(plan, "BTCUSDT", "")
    assert ledger.admit("over", "BTCUSDT", "").status == "dropped"
    r.hset(HEAT + "hit", "heat_level", "hot")
    ledger.wake(["hit"])
    move_lease(r, "late", 3000)
    ledger.look("late", 1, 0, 0)
    move_lease(r, "lost", 60_000)
    ledger.sweep()
    raw = {k.decode() for k in r.hkeys(C.COUNTERS)}
    assert raw == {"reason|create_apply_plan|missing", "reason|publish_plan_post|ok|wake|le:5", C.WAIT_SUM_MS,
                   "reason|publish_plan_post|timeout|look", "reason|publish_plan_post|timeout|sweep", C.DROPPED}
    c = counters(r)
    assert (c("p28_observed", LATE_POINT, "0"), c("p28_observed", LATE_POINT, "1"), c("p28_late_obs_recovered"),
            c("p28_late_obs_heat_wait_seconds_count"), c("p28_late_obs_dropped")) == (2, 1, 1, 1, 1)
