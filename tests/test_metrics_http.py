"""/metrics scraped over HTTP from a real worker: zero series at start, exact agreement with the stream."""

from __future__ import annotations

import subprocess
from collections import Counter

import redis
from prometheus_client.parser import text_string_to_metric_families

from observer_tasks import observe, observe_late
from observer_tasks.core import contract as C
from observer_tasks.core.settings import LATE_POINT, Settings

from .conftest import HEAT, REDIS_HOST, REDIS_PORT, STREAM, Worker, inflight, poll, scrape, stream_entries

#: Every configured observation point (P28_HEAT_OBS_POINTS' default, then publish_plan_post) and reason.
POINTS = Settings().obs_points
REASONS = C.REASONS


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_every_series_exists_at_zero_from_start(worker: Worker) -> None:
    text = scrape(worker.metrics_port)
    assert text is not None
    for point in POINTS:
        for found in ("0", "1"):
            assert f'p28_observed_total{{heat_found="{found}",obs_point="{point}"}} 0.0' in text
        for reason in REASONS:
            assert f'p28_heat_reason_total{{obs_point="{point}",reason="{reason}"}} 0.0' in text
        for cause in C.REFUSAL_CAUSES:
            assert f'p28_observe_refused_total{{cause="{cause}",obs_point="{point}"}} 0.0' in text
    assert POINTS == ("create_apply_plan", "reconcile_close_consume", LATE_POINT)
    for path in C.RECORD_PATHS:  # "admit" among them: heat written before the call
        assert f'p28_late_obs_recorded_total{{path="{path}"}} 0.0' in text
    for name in ("p28_late_obs_dropped_total", "p28_late_obs_lost_total", "p28_late_obs_recovered_total",
                 "p28_late_obs_redis_gaps_total", "p28_late_obs_inflight", "p28_late_obs_backlog"):
        assert f"\n{name} 0.0\n" in text, name
    assert "\np28_late_obs_wake_resyncs_total " in text  # 1 already: the listener's resync at its start
    assert 'p28_late_obs_heat_wait_seconds_bucket{le="+Inf"} 0.0' in text


def test_counters_agree_exactly_with_the_stream(r: redis.Redis, env: dict[str, str], start_worker) -> None:  # type: ignore[no-untyped-def]
    # 26 of the 40 plans get no heat and hold their slot for MAX_WAIT (600 ms, far longer than the loop):
    # with 20 slots some must be dropped, however fast the others are recorded. (The 14 whose heat hash is
    # written before the call are recorded by their admission and hold no slot.)
    env["P28_LATE_OBS_MAX_INFLIGHT"] = "20"
    w = start_worker()
    results: Counter[str] = Counter()
    for i in range(40):
        plan = f"x{i}"
        if i % 4 == 0:
            r.hset(HEAT + plan, "heat_level", "hot")
        if i % 10 == 9:
            r.set(HEAT + plan, "wrong type")
        observe(plan, "BTCUSDT", "EXECUTE")
        results[observe_late(plan, "BTCUSDT", "EXECUTE")] += 1
    poll(lambda: inflight(r) == 0, timeout=30, what="all late plans recorded")
    entries = stream_entries(r)
    observed = Counter((e["obs_point"], e["heat_found"]) for e in entries)
    reasons = Counter((e["obs_point"], e["heat_reason"]) for e in entries)
    got = samples(scrape(w.metrics_port) or "")
    for point in POINTS:
        for found in ("0", "1"):
            key = ("p28_observed_total", (("heat_found", found), ("obs_point", point)))
            assert got[key] == observed[(point, found)]
        for reason in REASONS:
            key = ("p28_heat_reason_total", (("obs_point", point), ("reason", reason)))
            assert got[key] == reasons[(point, reason)]
    # Written before the call: recorded by the admission itself (hits ok, the wrong type parse_error).
    assert got[("p28_late_obs_recorded_total", (("path", "admit"),))] == 14
    assert reasons[(LATE_POINT, "parse_error")] == 4
    # Plans that end early free their slot, so how many are dropped depends on timing; the sum does not.
    assert results["dropped"] > 0 and results["enqueued"] + results["dropped"] == 40
    assert got[("p28_late_obs_dropped_total", ())] == results["dropped"]
    assert observed[("publish_plan_post", "0")] + observed[("publish_plan_post", "1")] == results["enqueued"]
    hits = observed[("publish_plan_post", "1")]
    assert hits > 0 and got[("p28_late_obs_heat_wait_seconds_count", ())] == hits
    assert got[("p28_late_obs_heat_wait_seconds_bucket", (("le", "+Inf"),))] == hits


def test_the_checklists_verification_commands(r: redis.Redis, worker: Worker) -> None:
    for i in range(6):
        plan = f"v{i}"
        if i % 2:
            r.hset(HEAT + plan, "heat_level", "hot")
        observe(plan, "BTCUSDT", "EXECUTE")
        observe_late(plan, "BTCUSDT", "EXECUTE")
    poll(lambda: inflight(r) == 0, timeout=30, what="all late plans recorded")
    db = worker.env["REDIS_URL"].rsplit("/", 1)[1]
    port = worker.metrics_port
    stream = STREAM
    cli = f"redis-cli -h {REDIS_HOST} -p {REDIS_PORT} -n {db}"
    v1 = subprocess.run(["bash", "-c", f"""{cli} --raw XREVRANGE {stream} + - COUNT 600 | \\
awk '
tolower($0)=="obs_point"{{getline; op=$0}}
tolower($0)=="heat_found"{{getline; hf=$0; c[op,hf]++}}
END{{for (k in c) print k, c[k]}}' | sort"""], capture_output=True, text=True, check=True).stdout
    # awk joins the pair with SUBSEP; the checklist shows it as a space.
    assert v1.replace("\x1c", " ").splitlines() == ["create_apply_plan 0 3", "create_apply_plan 1 3",
                                                   "publish_plan_post 0 3", "publish_plan_post 1 3"]
    v2 = subprocess.run(["bash", "-c", f"""curl -s http://localhost:{port}/metrics | \\
grep -E '^p28_heat_reason_total\\{{obs_point="publish_plan_post",reason="(timeout|redis_error)"\\}}'"""],
                        capture_output=True, text=True, check=True).stdout
    assert v2.splitlines() == ['p28_heat_reason_total{obs_point="publish_plan_post",reason="timeout"} 3.0',
                               'p28_heat_reason_total{obs_point="publish_plan_post",reason="redis_error"} 0.0']
    v3 = subprocess.run(["bash", "-c", f"curl -s http://localhost:{port}/metrics | "
                         "grep -E '^p28_late_obs_dropped_total(\\{| )'"], capture_output=True, text=True, check=True)
    assert v3.stdout.splitlines() == ["p28_late_obs_dropped_total 0.0"]


def test_redis_down_at_scrape_leaves_counters_out(env: dict[str, str]) -> None:
    from prometheus_client import generate_latest

    from observer_tasks.core.connections import redis_client
    from observer_tasks.core.settings import Settings
    from observer_tasks.worker.metrics import registry

    from .conftest import free_port

    reg = registry(Settings.from_env(env), redis_client(f"redis://127.0.0.1:{free_port()}/0", 0.1, "test"))
    text = generate_latest(reg).decode()
    assert "p28_metrics_redis_up 0.0" in text and "p28_observed_total" not in text
