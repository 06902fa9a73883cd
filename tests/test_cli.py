"""The observer-tasks command line, against the real Redis and real worker processes."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from click.testing import CliRunner, Result

from observer_tasks import observe, observe_late
from observer_tasks.core import contract as C
from observer_tasks.core.ledger import heat_wait_buckets
from observer_tasks.core.settings import LATE_POINT, Settings
from observer_tasks.ops import broker, probes
from observer_tasks.ops.cli import main
from observer_tasks.ops.demo import PLAN_STREAM, RECONCILE
from observer_tasks.ops.latency import MARGIN
from observer_tasks.ops.reports import percentiles
from tests.conftest import (
    AMQP_URL,
    HEAT,
    ROOT,
    STREAM,
    Worker,
    cannot_run,
    counters,
    free_port,
    late_entries,
    poll,
    scrape,
)

CLI = str(Path(sys.executable).with_name("observer-tasks"))


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def add_entry(r: redis.Redis, obs_point: str, reason: str, wait_ms: int | None = None, plan_id: str = "p1") -> None:
    fields: dict[Any, Any] = {"ts_epoch": "1769650000.000", "plan_id": plan_id, "symbol": "BTCUSDT",
                              "apply_component": "apply", "obs_point": obs_point,
                              "heat_found": "1" if reason == "ok" else "0", "heat_reason": reason}
    if wait_ms is not None:
        fields["wait_ms"] = str(wait_ms)
    r.xadd(STREAM, fields)


def quick_status(*args: str) -> Result:
    """`status` with a short window (its drops and refusals line: 0.5 s): the tests below read the rest."""
    return invoke("status", "--window", "0.5", *args)


def rows(output: str) -> list[list[str]]:
    return [line.split() for line in output.splitlines()]


def run_cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


# -- pure and fast --------------------------------------------------------------------


def test_coverage_counts_the_newest_entries(r: redis.Redis, env: dict[str, str]) -> None:
    for _ in range(3):
        add_entry(r, "create_apply_plan", "missing")
    add_entry(r, "create_apply_plan", "ok")
    for _ in range(2):
        add_entry(r, "publish_plan_post", "timeout", 600)
    for _ in range(6):
        add_entry(r, "publish_plan_post", "ok", 200)

    result = invoke("coverage")
    assert result.exit_code == 0, result.output
    table = rows(result.output)
    assert ["obs_point", "heat_found", "count", "coverage"] in table
    assert ["create_apply_plan", "0", "3"] in table
    assert ["create_apply_plan", "1", "1", "25.0%"] in table
    assert ["publish_plan_post", "0", "2"] in table
    assert ["publish_plan_post", "1", "6", "75.0%"] in table

    newest = rows(invoke("coverage", "--count", "4").output)
    assert ["publish_plan_post", "1", "4", "100.0%"] in newest
    assert ["create_apply_plan", "0", "0"] in newest
    # Every configured observation point has its rows, the default third point too, 0 where it has no entries.
    assert ["reconcile_close_consume", "0", "0"] in table and ["reconcile_close_consume", "1", "0"] in table
    add_entry(r, "reconcile_close_consume", "ok")
    env["P28_HEAT_OBS_POINTS"] = "create_apply_plan,reconcile_close_consume,risk_check"  # the operator's points
    table = rows(invoke("coverage").output)
    assert ["reconcile_close_consume", "1", "1", "100.0%"] in table and ["risk_check", "0", "0"] in table


def test_latency_percentiles_headroom_and_histogram(r: redis.Redis, env: dict[str, str]) -> None:
    env["P28_LATE_OBS_MAX_WAIT_MS"] = "2000"
    env["P28_LATE_OBS_POLL_MS"] = "100"
    for wait in range(100, 1001, 100):
        add_entry(r, "publish_plan_post", "ok", wait)
    add_entry(r, "publish_plan_post", "timeout", 2003)
    add_entry(r, "publish_plan_post", "timeout", 2010)
    add_entry(r, "create_apply_plan", "missing")  # no wait_ms: ignored
    # The all-time histogram is the counters' late hits, one field per path and bucket (wait_sum_ms its sum).
    r.hset(C.COUNTERS, mapping={C.field(C.REASON, LATE_POINT, "ok", "look", C.BUCKET + "500"): 2,
                                C.field(C.REASON, LATE_POINT, "ok", "wake", C.BUCKET + "500"): 1,
                                C.field(C.REASON, LATE_POINT, "ok", "wake", C.BUCKET + "1000"): 2,
                                C.field(C.REASON, LATE_POINT, "timeout", "look"): 2, C.WAIT_SUM_MS: 2500})

    result = invoke("latency")
    assert result.exit_code == 0, result.output
    table = rows(result.output)
    # inclusive percentiles of 100..1000: p50 550, p90 910, p95 955, p99 991
    assert ["hit", "10", "550", "910", "955", "991", "1000"] in table
    assert [row[:2] for row in table if row[:1] == ["timeout"]][0] == ["timeout", "2"]
    assert "p99 of hits 991 ms is 1009 ms (50.5%) below MAX_WAIT_MS=2000" in result.output
    # (Issue 26 item 3: the recommendation comes from the all-time histogram, not from the newest entries' p99,
    # which recommended 1300 here: 5 hits are too few for a p99.)
    assert "recommended P28_LATE_OBS_MAX_WAIT_MS: none yet: 5 hits in the all-time histogram" in result.output
    assert f"heat-wait histogram ({C.COUNTERS}, all time: 5 hits, mean 500 ms)" in result.output
    assert ["500", "3", "3", "60.0%"] in table
    assert ["1000", "2", "5", "100.0%"] in table
    assert ["+Inf", "0", "5", "100.0%"] in table


def test_latency_without_data(r: redis.Redis) -> None:
    result = invoke("latency")
    assert result.exit_code == 0, result.output
    assert "no publish_plan_post hits yet" in result.output


def workload_hits(seed: int, median_ms: float, plans: int, wait_ms: int = 2000, poll_ms: int = 100) -> list[int]:
    """The hits' wait_ms of `plans` plans whose heat comes after a lognormal delay (the demo's HeatBridge: sigma
    0.6): those found by the deadline + POLL_MS."""
    rng = random.Random(seed)
    waits = (round(rng.lognormvariate(math.log(median_ms), 0.6)) for _ in range(plans))
    return [w for w in waits if w <= wait_ms + poll_ms]


def record_hits(r: redis.Redis, hits: list[int], settings: Settings) -> None:
    """The hits as the workers record them: an entry each, and one counter field per hit (its bucket)."""
    bounds = heat_wait_buckets(settings)
    buckets = Counter(next((str(b) for b in bounds if w <= b), "+Inf") for w in hits)
    pipe = r.pipeline(transaction=False)
    for n, wait in enumerate(hits):
        pipe.xadd(STREAM, {"plan_id": f"w{n}", "obs_point": LATE_POINT, "heat_found": "1", "heat_reason": "ok",
                           "wait_ms": str(wait)})
    for bound, n in buckets.items():
        pipe.hincrby(C.COUNTERS, C.field(C.REASON, LATE_POINT, "ok", "wake", C.BUCKET + bound), n)
    pipe.hincrby(C.COUNTERS, C.WAIT_SUM_MS, sum(hits))
    pipe.execute()


def recommended(output: str) -> str:
    return next(line for line in output.splitlines() if line.startswith("recommended P28_LATE_OBS_MAX_WAIT_MS"))


def test_latency_recommendation_is_stable_on_one_workload_and_moves_with_it(r: redis.Redis,
                                                                           env: dict[str, str]) -> None:
    """Issue 26: on one workload the recommended MAX_WAIT_MS swung 1800 / 2000 / 2100 between runs."""
    env.update({"P28_LATE_OBS_MAX_WAIT_MS": "2000", "P28_LATE_OBS_POLL_MS": "100"})
    settings = Settings.from_env()
    advised, former = [], []
    for seed in (1, 2, 3):  # three runs of `latency`, 700 more plans of one workload before each
        hits = workload_hits(seed, 400, 700)
        record_hits(r, hits, settings)
        result = invoke("latency", "--count", str(len(hits)))
        assert result.exit_code == 0, result.output
        advised.append(recommended(result.output).split(" (")[0])  # the value and what to do with it
        # The former rule: the newest entries' p99 of hits x 1.25, rounded up to POLL_MS.
        former.append(math.ceil(percentiles(hits)["p99"] * MARGIN / 100) * 100)
    assert former == [1800, 1800, 2000]  # it swung on this workload
    assert advised == [advised[0]] * 3, advised
    assert advised[0] == "recommended P28_LATE_OBS_MAX_WAIT_MS=2000: keep it"
    assert recommended(result.output).startswith(f"{advised[0]} (the wait needed, 18")  # 1842, 1838, 1856 ms
    assert "  how: p99 of the all-time heat-wait histogram (" in result.output
    # HeatBridge slows down (median 700 ms: its tail passes the deadline): one runbook step up, measured again after.
    record_hits(r, workload_hits(4, 700, 2100), settings)
    moved = recommended(invoke("latency").output)
    assert moved.startswith("recommended P28_LATE_OBS_MAX_WAIT_MS=3000: the wait needed, "), moved
    assert "raise P28_LATE_OBS_MAX_WAIT_MS to 3000 (the runbook's steps: 2000 -> 3000 -> 4000)" in moved

def test_config_check_good_env_file(tmp_path: Path, env: dict[str, str]) -> None:
    env["P28_LATE_OBS_MAX_WAIT_MS"] = "not-read"  # the file is checked, not the environment
    path = tmp_path / "apply-layer.env"
    path.write_text("# P2.8A.3 Late Observer (HeatBridge's lag)\n"
                    "\n"
                    "P28_LATE_OBS_ENABLED=false\n"
                    "# raised after Alert 2: it's tuning\n"
                    "P28_LATE_OBS_MAX_WAIT_MS=3000   \n"
                    "P28_LATE_OBS_POLL_MS=100\n"
                    "REDIS_URL=redis://:s3cret@10.0.0.5:6379/0\n"
                    "P28_LATE_OBS_MAX_WAIT=5000\n"
                    "  P28_HEAT_OBS_STREAM=obs#1\n")
    # (--offline: the file names a Redis this host does not reach; issue 26 item 4 asks it otherwise.)
    result = invoke("config", "check", "--env-file", str(path), "--offline")
    assert result.exit_code == 0, result.output
    table = rows(result.output)
    assert ["P28_LATE_OBS_ENABLED", "false", f"{path}:3"] in table
    assert ["P28_LATE_OBS_MAX_WAIT_MS", "3000", f"{path}:5"] in table
    assert ["P28_LATE_OBS_POLL_MS", "100", f"{path}:6"] in table
    assert ["P28_LATE_OBS_MAX_INFLIGHT", "200", "default"] in table
    assert ["P28_HEAT_OBS_STREAM", "obs#1", f"{path}:9"] in table
    assert ["REDIS_URL", "redis://:***@10.0.0.5:6379/0", f"{path}:7"] in table
    assert "s3cret" not in result.output
    assert "P28_LATE_OBS_MAX_WAIT is not a setting" in result.output


def test_config_check_accepts_the_shipped_env_file(env: dict[str, str]) -> None:
    path = ROOT / "deploy" / "observer.env"
    result = invoke("config", "check", "--env-file", str(path), "--offline")  # (compose's Redis: not reachable here)
    assert result.exit_code == 0, result.output
    sources = {row[0]: row[-1] for row in rows(result.output)}
    assert sources["P28_LATE_OBS_MAX_WAIT_MS"].startswith(f"{path}:")


@pytest.mark.parametrize(("text", "message"), [
    ("P28_HEAT_OBS_STREAM=a b\n", ":1: refused: whitespace inside the value"),
    ("P28_LATE_OBS_MAX_WAIT_MS=abc\n", ":1: P28_LATE_OBS_MAX_WAIT_MS='abc' is not a whole number"),
    ("P28_LATE_OBS_ENABLED=maybe\n", "P28_LATE_OBS_ENABLED='maybe' is not a boolean"),
    ("# ok\nP28_LATE_OBS_MAX_INFLIGHT=0\n", ":2: P28_LATE_OBS_MAX_INFLIGHT='0' is out of range"),
    ("P28_LATE_OBS_POLL_MS='unterminated\n", ":1: refused: a quoted value"),
    ("# ok\nP28_LATE_OBS_POLL_MS 100\n", ":2: refused: no '='"),
    ("export P28_LATE_OBS_POLL_MS=100\n", ":1: refused: `export NAME=...`"),
    ('P28_LATE_OBS_POLL_MS="100"\n', ":1: refused: a quoted value: systemd strips the quotes"),
    ("P28_LATE_OBS_POLL_MS=100 # tuned\n", ":1: refused: a comment after the value: systemd keeps"),
    ("P28_LATE_OBS_POLL_MS = 100\n", ":1: refused: spaces around '='"),
    ("REDIS_URL=redis://h:6379/0\\\n\n", ":1: refused: a backslash continuation"),
    ("REDIS_URL=unix:///run/redis.sock\n", "REDIS_URL='unix:///run/redis.sock' must be a URL with scheme redis/rediss"),
])
def test_config_check_refuses_in_one_line_with_exit_2(tmp_path: Path, env: dict[str, str], text: str,
                                                       message: str) -> None:
    path = tmp_path / "bad.env"
    path.write_text(text)
    result = invoke("config", "check", "--env-file", str(path))
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert message in result.output


def test_config_check_help_says_what_it_accepts() -> None:
    text = " ".join(invoke("config", "check", "--help").output.split())
    assert "read as systemd's EnvironmentFile= reads them" in text
    assert "Refused (exit 2): `export`, quotes, backslashes" in text
    assert "allowed" not in text


def test_config_check_reads_the_environment_by_default(env: dict[str, str]) -> None:
    result = invoke("config", "check")
    assert result.exit_code == 0, result.output
    assert ["P28_LATE_OBS_MAX_WAIT_MS", "600", "env"] in rows(result.output)
    env["P28_LATE_OBS_POLL_MS"] = "5000"
    result = invoke("config", "check")
    assert result.exit_code == 2
    assert "P28_LATE_OBS_POLL_MS=5000 is above P28_LATE_OBS_MAX_WAIT_MS=600" in result.output


def one_line(result: Result) -> str:
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


def test_config_check_exits_1_naming_an_unreachable_redis_or_broker_and_0_offline(env: dict[str, str]) -> None:
    """Issue 26: `config check` exited 0 against an unreachable Redis."""
    data, celery = env["REDIS_URL"], env["CELERY_BROKER_URL"]
    env["REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    result = invoke("config", "check")
    assert result.exit_code == 1
    assert one_line(result).startswith(f"Error: environment: REDIS_URL={env['REDIS_URL']}: cannot reach Redis (")
    assert invoke("config", "check", "--offline").exit_code == 0
    env["REDIS_URL"], env["CELERY_BROKER_URL"] = data, f"redis://127.0.0.1:{free_port()}/1"  # a Redis broker
    result = invoke("config", "check")
    assert result.exit_code == 1
    assert one_line(result).startswith(f"Error: environment: CELERY_BROKER_URL={env['CELERY_BROKER_URL']}: cannot "
                                       "reach Redis (")
    # The broker's precedence: P28_LATE_OBS_BROKER_URL first (here RabbitMQ, unreachable), shown when it answers.
    env["P28_LATE_OBS_BROKER_URL"] = f"amqp://guest:guest@127.0.0.1:{free_port()}//"
    result = invoke("config", "check")
    assert result.exit_code == 1
    assert "P28_LATE_OBS_BROKER_URL=amqp://guest:***@127.0.0.1:" in one_line(result)
    assert ": cannot reach the broker (" in result.output
    offline = invoke("config", "check", "--offline")
    assert offline.exit_code == 0 and "not asked (--offline): Redis, the broker" in offline.output
    env["CELERY_BROKER_URL"], env["P28_LATE_OBS_BROKER_URL"] = celery, AMQP_URL
    result = invoke("config", "check")
    assert result.exit_code == 0, result.output
    assert "broker: amqp://guest:***@" in result.output
    assert ("(from P28_LATE_OBS_BROKER_URL; precedence: P28_LATE_OBS_BROKER_URL, else CELERY_BROKER_URL, else "
            "REDIS_URL)") in result.output
    assert ["CELERY_BROKER_URL", env["CELERY_BROKER_URL"], "env"] in rows(result.output)


def test_config_check_exits_2_when_the_broker_refuses_the_user(env: dict[str, str]) -> None:
    env["CELERY_BROKER_URL"] = AMQP_URL.replace(f":{urlsplit(AMQP_URL).password}@", ":wrong-Pw@")
    result = invoke("config", "check")
    assert result.exit_code == 2
    line = one_line(result)
    assert "CELERY_BROKER_URL=amqp://guest:***@" in line and "the broker refuses the user (AccessRefused" in line
    assert "wrong-Pw" not in line


@pytest.mark.parametrize("args", [["coverage"], ["latency"], ["verify"], ["status"], ["status", "--check"]])
def test_unreachable_redis_is_one_clear_line(env: dict[str, str], args: list[str]) -> None:
    env["REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/11"
    result = invoke(*args)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [result.output.strip()]
    assert result.output.startswith("Error: cannot reach Redis at redis://127.0.0.1:")


def test_unreachable_redis_from_the_shell_has_no_traceback(env: dict[str, str]) -> None:
    env["REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/11"
    done = run_cli(env, "coverage", timeout=30)
    assert done.returncode == 1
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "cannot reach Redis" in done.stderr


def test_every_command_has_examples_in_its_help() -> None:
    for args in (["demo"], ["verify"], ["coverage"], ["latency"], ["status"], ["metrics"], ["config", "check"]):
        result = invoke(*args, "--help")
        assert result.exit_code == 0
        assert "Examples:" in result.output and "observer-tasks " in result.output, args


# -- with real workers ------------------------------------------------------------------


def observe_some_plans(r: redis.Redis) -> None:
    for plan in ("cli-hit-1", "cli-hit-2"):
        r.hset(HEAT + plan, mapping={"heat_level": "hot", "heat_score": "0.9"})
    for plan in ("cli-hit-1", "cli-hit-2", "cli-miss-1"):
        assert observe_late(plan, "BTCUSDT", "EXECUTE") == "enqueued"
    poll(lambda: len(late_entries(r)) == 3, what="three publish_plan_post entries")


def test_verify_healthy_with_a_worker_then_failing_when_it_stops(r: redis.Redis, worker: Worker) -> None:
    observe_some_plans(r)
    url = f"http://127.0.0.1:{worker.metrics_port}/metrics"

    result = invoke("verify", "--window", "1", "--metrics-url", url, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["healthy"] is True
    assert report["coverage"]["publish_plan_post"] == {"found": 2, "not_found": 1, "total": 3, "coverage_pct": 66.7}
    assert report["metrics"] == {"url": url, "timeout": 1.0, "redis_error": 0.0, "dropped": 0.0}
    assert report["advice"] == []

    text = invoke("verify", "--window", "1", "--metrics-url", url)
    assert text.exit_code == 0, text.output
    assert "OK    timeout and redis_error series on /metrics: timeout=1 redis_error=0" in text.output
    assert text.output.rstrip().endswith("healthy")

    worker.stop()
    result = invoke("verify", "--window", "1", "--metrics-url", url)
    assert result.exit_code == 1
    assert "FAIL  timeout and redis_error series on /metrics: cannot read" in result.output
    assert result.output.rstrip().endswith("UNHEALTHY")


def test_verify_fails_without_late_hits_and_gives_advice(r: redis.Redis, worker: Worker) -> None:
    for n in range(3):
        add_entry(r, "publish_plan_post", "timeout", 600, plan_id=f"t{n}")
    add_entry(r, "publish_plan_post", "redis_error", 100, plan_id="e1")
    r.hset(C.COUNTERS, mapping={C.field(C.REASON, LATE_POINT, "redis_error", "look"): 1, C.DROPPED: 4})

    url = f"http://127.0.0.1:{worker.metrics_port}/metrics"
    result = invoke("verify", "--window", "1", "--metrics-url", url, "--json")
    assert result.exit_code == 1
    report = json.loads(result.output)
    failed = [c["name"] for c in report["checks"] if not c["ok"]]
    assert failed == ["publish_plan_post entries with hits", "no redis_error in the recent entries"]
    advice = " | ".join(report["advice"])
    # (Issue 26 item 1: the advice reads the window, not the lifetime counters: the 4 drops of the past neither
    # say "fix the drops first" nor "raise MAX_INFLIGHT" now; the next MAX_WAIT_MS step instead.)
    assert "timeouts are 75% of publish_plan_post (>50%): raise P28_LATE_OBS_MAX_WAIT_MS to 1000" in advice
    assert re.search(r"redis_error in 1 of the recent entries \(0 in the last \d+ s\): an infrastructure problem",
                     advice)
    assert "MAX_INFLIGHT" not in advice and "drops" not in advice
    assert re.fullmatch(r"0 in the last \d+ s; p28_late_obs_dropped_total 4 all time", report["checks"][-2]["detail"])


class Spell(threading.Thread):
    """Makes one call over and over (every 20 ms) from its own thread until the block ends: a spell that covers
    the whole window of the command run inside the block."""

    def __init__(self, call: Callable[[], str]) -> None:
        super().__init__(daemon=True)
        self.call, self.stopped, self.results = call, threading.Event(), Counter[str]()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.results[self.call()] += 1
            self.stopped.wait(0.02)  # pacing: one call per 20 ms

    def __enter__(self) -> Spell:
        self.start()
        poll(lambda: self.results, what="the spell's first call")
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stopped.set()
        self.join(10)


def failed_checks(result: Result) -> tuple[list[str], dict[str, Any]]:
    report = json.loads(result.output)
    return [c["name"] for c in report["checks"] if not c["ok"]], report


def test_verify_fails_during_a_drop_spell_and_a_refusal_spell_and_is_healthy_after_them(
        r: redis.Redis, env: dict[str, str], start_worker: Callable[..., Worker]) -> None:
    """Issue 26's "Done when": `verify` exits non-zero during a drop spell (it said healthy, exit 0, coverage 71.6 %
    during a 60 % drop rate)."""
    env.update({**PARKED, "P28_LATE_OBS_MAX_INFLIGHT": "2"})  # leases live a minute: two fill MAX_INFLIGHT
    url = f"http://127.0.0.1:{start_worker().metrics_port}/metrics"
    for plan in ("spell-hit-1", "spell-hit-2"):  # heat first: recorded at admission, hits
        r.hset(HEAT + plan, mapping={"heat_level": "hot", "heat_score": "0.9"})
        assert observe_late(plan, "BTCUSDT", "EXECUTE") == "enqueued"
    waiting_plans(2)
    poll(lambda: len(late_entries(r)) == 2 and r.hlen(C.PRODUCERS), what="the hits recorded, the limits reported")
    assert invoke("verify", "--window", "1", "--metrics-url", url).exit_code == 0

    plans = iter(range(10**6))
    with Spell(lambda: observe_late(f"drop-{next(plans)}", "BTCUSDT", "EXECUTE")) as drops:
        result = invoke("verify", "--window", "2", "--metrics-url", url, "--json")
    assert result.exit_code == 1, result.output
    failed, report = failed_checks(result)
    assert failed == ["no plans dropped in the window"], report
    assert set(drops.results) <= {"dropped", "deferred"}  # (deferred: made by the outbox thread, and dropped there)
    dropped = report["window"]["dropped"]
    # (the window's length as Redis measured it: 2 s, or more on a loaded machine)
    assert dropped >= 10 and re.match(rf"{dropped} in the last \d+ s \(", report["checks"][-2]["detail"])
    # Not observed: the window's coverage counts them (nothing was recorded in it: 0 %), not the stream's 100 %.
    assert report["coverage"][LATE_POINT] == {"found": 0, "not_found": 0, "dropped": dropped, "refused": 0,
                                              "total": dropped, "coverage_pct": 0.0}
    assert any(re.match(rf"dropped {dropped} in the last \d+ s", a) and "saturation (2 live leases): raise "
               "P28_LATE_OBS_MAX_INFLIGHT first (e.g. 4)" in a for a in report["advice"]), report["advice"]

    # Every call of the spell counted (one made late by the outbox thread is a drop too) before the next window.
    poll(lambda: counters(r)("p28_late_obs_dropped") == sum(drops.results.values()), what="every drop counted")
    with Spell(lambda: observe_late("", "BTCUSDT", "EXECUTE")) as refusals:  # any cause: here invalid_input
        result = invoke("verify", "--window", "1", "--metrics-url", url, "--json")
    assert result.exit_code == 1, result.output
    failed, report = failed_checks(result)
    assert failed == ["no calls refused in the window"] and set(refusals.results) == {"error"}
    assert "invalid_input" in report["checks"][-1]["detail"]
    assert any("(invalid_input): the apply layer passes invalid arguments" in a for a in report["advice"])

    # After the spells (every call counted), the window is quiet: healthy, though the lifetime counters remember.
    poll(lambda: sum(n for k, n in counters(r).items() if k[0] == "p28_observe_refused") == refusals.results["error"],
         what="every refusal counted")
    result = invoke("verify", "--window", "1", "--metrics-url", url, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["advice"] == [] and report["coverage"][LATE_POINT]["coverage_pct"] == 100.0
    assert re.fullmatch(rf"0 in the last \d+ s; p28_late_obs_dropped_total {sum(drops.results.values())} all time",
                        report["checks"][-2]["detail"])


def test_verify_reads_this_hosts_metrics_port_from_the_settings(r: redis.Redis, worker: Worker,
                                                                 env: dict[str, str]) -> None:
    observe_some_plans(r)
    env["P28_METRICS_PORT"] = str(worker.metrics_port)  # not 8043: the worker's, as in the host's env file
    env["P28_METRICS_ADDR"] = "0.0.0.0"  # a wildcard bind is reached on loopback
    result = invoke("verify", "--window", "1", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["metrics"]["url"] == f"http://127.0.0.1:{worker.metrics_port}/metrics"

    env["P28_METRICS_ADDR"] = "127.0.0.1"
    assert invoke("verify", "--window", "1").exit_code == 0
    # an explicit --metrics-url still wins
    result = invoke("verify", "--window", "1", "--metrics-url", f"http://127.0.0.1:{free_port()}/metrics")
    assert result.exit_code == 1
    assert "worker or exporter stopped" in result.output


def test_verify_with_metrics_port_0_says_how_to_point_it_at_an_exporter(
        r: redis.Redis, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probes, "EXPORTER_PORT", free_port())  # 8043 may be taken on a shared host
    env["P28_METRICS_PORT"] = "0"
    result = invoke("verify", "--window", "1")
    assert result.exit_code == 1
    assert (f"cannot read http://127.0.0.1:{probes.EXPORTER_PORT}/metrics" in result.output
            and "P28_METRICS_PORT=0, so no worker on this host serves /metrics, and no `observer-tasks metrics` "
                "exporter answers on its default port" in result.output
            and "pass --metrics-url http://HOST:PORT/metrics" in result.output), result.output


def test_verify_advises_the_runbooks_next_max_wait_step(r: redis.Redis, env: dict[str, str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    env["P28_LATE_OBS_MAX_WAIT_MS"] = "2000"
    for n in range(3):
        add_entry(r, "publish_plan_post", "timeout", 2000, plan_id=f"t{n}")
    add_entry(r, "publish_plan_post", "ok", 900, plan_id="h1")
    monkeypatch.setattr(probes, "EXPORTER_PORT", free_port())

    def first_advice() -> str:
        return str(json.loads(invoke("verify", "--window", "1", "--json").output)["advice"][0])

    assert first_advice().startswith("timeouts are 75% of publish_plan_post (>50%): "
                                     "raise P28_LATE_OBS_MAX_WAIT_MS to 3000")
    env["P28_LATE_OBS_MAX_WAIT_MS"] = "3000"
    assert "raise P28_LATE_OBS_MAX_WAIT_MS to 4000" in first_advice()
    env["P28_LATE_OBS_MAX_WAIT_MS"] = "4000"
    assert "do not raise it further, look at HeatBridge's lag" in first_advice()


def test_status_check_needs_a_worker(r: redis.Redis, start_worker: Callable[..., Worker]) -> None:
    result = quick_status("--check")
    assert result.exit_code == 1
    assert "workers:    0 consuming late_obs" in result.output
    assert result.output.rstrip().endswith("status check failed: no worker consumes late_obs")
    assert ["P28_LATE_OBS_MAX_WAIT_MS", "600", "env"] in rows(result.output)
    assert ["P28_LATE_OBS_MAX_INFLIGHT", "200", "default"] in rows(result.output)

    start_worker()
    r.xadd(probes.HEAT_DECISIONS, {"plan_id": "x"})
    r.xgroup_create(probes.HEAT_DECISIONS, probes.HEAT_BRIDGE_GROUP, id="0")
    # the worker serves /metrics (ready) a moment before it answers Celery's control broadcast
    result = poll(lambda: (x := quick_status("--check")).exit_code == 0 and x, what="status --check passing")
    assert re.search(r"workers: +1 consuming late_obs: test-[0-9a-f]{8}@", result.output)
    assert "broker:     redis://127.0.0.1:" in result.output and "late_obs queue length 0" in result.output
    assert "in flight:  0 of P28_LATE_OBS_MAX_INFLIGHT=200" in result.output
    assert f"group {probes.HEAT_BRIDGE_GROUP} on {probes.HEAT_DECISIONS}: lag 1, pending 0" in result.output


#: Plans that wait: no heat, and 20 s between looks, so each parks in the worker after its first look.
PARKED = {"P28_LATE_OBS_MAX_WAIT_MS": "60000", "P28_LATE_OBS_POLL_MS": "20000"}


def waiting_plans(n: int) -> None:
    # Handed over either way: "deferred" when this loaded machine's Redis took longer than the call's 50 ms cap
    # (the background thread admits it a moment later; the tests poll for what they count).
    for i in range(n):
        assert observe_late(f"park-{i}", "BTCUSDT", "EXECUTE") in ("enqueued", "deferred")


def broker_line_with(text: str) -> str | None:
    line = next(x for x in quick_status().output.splitlines() if x.startswith("broker:"))
    return line if text in line else None


def test_status_counts_ready_messages_on_the_redis_broker(r: redis.Redis, env: dict[str, str]) -> None:
    env.update(PARKED)
    waiting_plans(100)  # no worker: every first message waits in the list
    poll(lambda: broker_line_with("late_obs queue length 100 (100 ready, 0 parked for their countdown)"),
         what="100 ready messages")


def test_status_counts_parked_countdown_messages_on_the_redis_broker(r: redis.Redis, env: dict[str, str],
                                                                    start_worker: Callable[..., Worker]) -> None:
    env.update(PARKED)
    start_worker()
    waiting_plans(100)  # each plan's message waits its countdown in the worker, in kombu's unacked hash
    poll(lambda: broker_line_with("late_obs queue length 100 (0 ready, 100 parked for their countdown)"),
         timeout=30, what="100 parked messages")
    assert "in flight:  100 of P28_LATE_OBS_MAX_INFLIGHT=200" in quick_status().output
    assert redis.Redis.from_url(env["CELERY_BROKER_URL"]).llen("late_obs") == 0  # all LLEN alone would show


def test_status_counts_unacknowledged_messages_on_rabbitmq(r: redis.Redis, env: dict[str, str], amqp_broker: str,
                                                          start_worker: Callable[..., Worker]) -> None:
    if not shutil.which("rabbitmqctl"):
        cannot_run("needs rabbitmqctl on this host")
    env.update(PARKED)
    # Ready when status sees it consume: its own Celery app per broker, unlike conftest's wait_ready ping,
    # whose broadcast goes out on the shared app's pool (bound to whichever broker a test used first).
    start_worker(wait=False)
    poll(lambda: "workers:    1 consuming late_obs" in quick_status().output, timeout=30, what="worker consuming")
    waiting_plans(100)
    poll(lambda: broker_line_with("late_obs queue length 100 (0 ready, 100 unacknowledged: parked for their "
                                  "countdown)"), timeout=30, what="100 unacknowledged messages")


def test_status_shows_each_workers_heartbeat(r: redis.Redis, env: dict[str, str]) -> None:
    now_ms = int(r.time()[0]) * 1000
    r.hset(C.WORKERS, mapping={
        "celery@alive": json.dumps({"seen_ms": now_ms - 300, "pid": 11, "host": "alive", "wake": "connected",
                                    "last_push_age_ms": 2200, "resyncs": 1}),
        "celery@gone": json.dumps({"seen_ms": now_ms - 30_000, "pid": 12, "host": "gone", "wake": "reconnecting",
                                   "last_push_age_ms": None, "resyncs": 4}),
    })
    out = quick_status().output
    assert f"heartbeats: 1 fresh of 2 in {C.WORKERS}" in out
    table = rows(out)
    alive = next(row for row in table if row[:1] == ["celery@alive"])
    assert alive[1] == "ok" and alive[3] == "connected" and alive[5] == "1"
    assert 0.3 <= float(alive[2].rstrip("s")) < 10 and 2.5 <= float(alive[4].rstrip("s")) < 12
    gone = next(row for row in table if row[:1] == ["celery@gone"])
    assert gone[1] == "STALE" and gone[3:6] == ["reconnecting", "-", "4"]
    assert "wake path:  P28_LATE_OBS_WAKE=true, P28_LATE_OBS_SAFETY_POLL_MS=" in out


def status_rows(out: str, *first: str) -> list[str]:
    """The limits of the one row of status's limits table that starts with `first` (its role and its name)."""
    (row,) = [row for row in rows(out) if row[:len(first)] == list(first)]
    return row[len(first):len(first) + 5]


def test_status_shows_the_running_limits_a_mismatch_the_backlog_gaps_and_recent_refusals(
        r: redis.Redis, env: dict[str, str], start_worker: Callable[..., Worker]) -> None:
    """Issue 26: `status` printed MAX_INFLIGHT from the operator's env, not the running apply layer's, and no drops."""
    worker = start_worker()
    poll(lambda: b"points" in (r.hget(C.WORKERS, worker.nodename) or b""), what="the worker's heartbeat")
    # This process is an apply layer running with MAX_INFLIGHT=50 and MAX_WAIT_MS=700 (its report, every 10 s) ...
    env.update({"P28_LATE_OBS_MAX_INFLIGHT": "50", "P28_LATE_OBS_MAX_WAIT_MS": "700"})
    assert observe_late("limits-1", "BTCUSDT", "EXECUTE") == "enqueued"
    poll(lambda: r.hlen(C.PRODUCERS), what="the apply layer's report")
    # No worker decides anything now (its last heartbeat stays fresh for 10 s): what is past its end stays there.
    worker.stop()
    # ... while the operator's environment (and the worker) say MAX_WAIT_MS=600, MAX_INFLIGHT=200.
    operator = {"P28_LATE_OBS_MAX_INFLIGHT": "200", "P28_LATE_OBS_MAX_WAIT_MS": "600"}
    now_ms = int(r.time()[0]) * 1000
    r.zadd(C.GAPS, {f"{now_ms - 12_000}-{now_ms - 3_000}": now_ms - 3_000})  # a 9 s gap a worker recorded
    r.zadd(C.INFLIGHT, {"nobody-decides-it": now_ms - 60_000})  # a plan long past its end: the backlog
    with Spell(lambda: observe("", "BTCUSDT", "EXECUTE")):  # calls refused throughout the window
        out = CliRunner().invoke(main, ["status", "--window", "1"], env=operator).output
    points = "create_apply_plan,reconcile_close_consume"
    # (its safety poll: MAX_WAIT_MS, P28_LATE_OBS_SAFETY_POLL_MS being unset)
    assert status_rows(out, "apply", f"{socket.gethostname()}:{os.getpid()}") == ["50", "700", "50", "700", points]
    assert status_rows(out, "worker", worker.nodename) == ["-", "600", "50", "600", points]
    assert status_rows(out, "env", "this", "environment")[:2] == ["200", "600"]
    assert re.search(r"^in flight:  [01] of P28_LATE_OBS_MAX_INFLIGHT=50 \(the running apply layers'\)$", out, re.M)
    mismatches = [line for line in out.splitlines() if line.startswith("MISMATCH:")]
    assert any(line.startswith("MISMATCH:   P28_LATE_OBS_MAX_INFLIGHT differs: 50 on apply ") and
               line.endswith("; 200 on this environment") for line in mismatches), out
    assert any(line.startswith("MISMATCH:   P28_LATE_OBS_MAX_WAIT_MS differs: 700 on apply ") and
               f"; 600 on worker {worker.nodename}, this environment" in line for line in mismatches), out
    # (the plan above too, once its lease has ended)
    assert re.search(r"^backlog:    [12] plans past their deadline \+ sweeper grace that no worker decided", out, re.M)
    assert re.search(r"^redis gaps: .*1 in the last 60 min: ended \d+ s ago, lasted 9\.0 s$", out, re.M), out
    assert re.search(r"^last \d+ s: +dropped 0, refused [1-9]\d* \(invalid_input [1-9]\d* \(create_apply_plan\)\)",
                     out, re.M), out


def test_status_check_fails_when_the_broker_is_down(r: redis.Redis, env: dict[str, str]) -> None:
    env["CELERY_BROKER_URL"] = f"redis://127.0.0.1:{free_port()}/12"
    assert quick_status().exit_code == 0
    result = quick_status("--check")
    assert result.exit_code == 1
    assert "UNREACHABLE" in result.output
    assert "status check failed: broker unreachable" in result.output


def test_metrics_exporter_serves_until_sigterm(r: redis.Redis, env: dict[str, str]) -> None:
    port = free_port()
    with subprocess.Popen([CLI, "metrics", "--port", str(port), "--addr", "127.0.0.1"], env={**os.environ, **env},
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
        try:
            page = poll(lambda: proc.poll() is not None or scrape(port), what="the exporter's /metrics")
            assert isinstance(page, str), proc.communicate()
            assert "p28_late_obs_dropped_total 0.0" in page
            assert 'p28_heat_reason_total{obs_point="publish_plan_post",reason="redis_error"} 0.0' in page
        finally:
            proc.send_signal(signal.SIGTERM)
            _out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert f"serving http://127.0.0.1:{port}/metrics" in err


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the exporter binds: TIME_WAIT is no obstacle
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_metrics_exporter_serves_on_8043_when_workers_serve_none(r: redis.Redis, env: dict[str, str]) -> None:
    """The runbook: P28_METRICS_PORT=0 in the host's env file, `observer-tasks metrics` once; verify finds it."""
    if not port_is_free(8043):
        cannot_run("port 8043 is taken on this host")
    env["P28_METRICS_PORT"] = "0"
    with subprocess.Popen([CLI, "metrics", "--addr", "127.0.0.1"], env={**os.environ, **env},
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
        try:
            page = poll(lambda: proc.poll() is not None or scrape(8043), what="the exporter's /metrics on 8043")
            assert isinstance(page, str), proc.communicate()
            report = json.loads(invoke("verify", "--window", "1", "--json").output)
            assert report["metrics"]["url"] == "http://127.0.0.1:8043/metrics"
            assert report["checks"][1]["ok"] and report["checks"][2]["ok"], report
        finally:
            proc.send_signal(signal.SIGTERM)
            _out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "serving http://127.0.0.1:8043/metrics" in err


# -- demo ---------------------------------------------------------------------------------


def test_demo_runs_the_pipeline_and_ends_with_the_coverage_table(r: redis.Redis, env: dict[str, str]) -> None:
    add_entry(r, "publish_plan_post", "ok", 100, plan_id="not-this-run")
    done = run_cli(env, "demo", "--seconds", "3", "--seed", "1", "--redis-url", env["REDIS_URL"],
                   "--broker-url", env["CELERY_BROKER_URL"], "--force")  # (--force: a plan not a demo's is there)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "started worker demo-" in out
    assert re.search(r"^ +1s +published +\d+ +in flight", out, re.M), out
    published = int(re.search(r"run [0-9a-f]{8}: (\d+) plans published", out).group(1))
    assert published == 30  # 10 plans/s for 3 s
    table = rows(out[re.search(r"obs_point +heat_found", out).start():])
    late = {row[1]: int(row[2]) for row in table if row[:1] == ["publish_plan_post"] and row[1] in ("0", "1")}
    early = {row[1]: int(row[2]) for row in table if row[:1] == ["create_apply_plan"] and row[1] in ("0", "1")}
    assert late["0"] + late["1"] == published and late["1"] > 0  # this run's plans only, all finished
    assert early["0"] + early["1"] == published
    # The third point: its RECONCILE_CLOSE plans observed at reconcile_close_consume too, in the table.
    reconciled = int(re.search(rf"{RECONCILE} plans observed at the other early points too: (\d+) calls", out).group(1))
    third = {row[1]: int(row[2]) for row in table if row[:1] == ["reconcile_close_consume"] and row[1] in ("0", "1")}
    assert third["0"] + third["1"] == reconciled > 0
    assert "unfinished at the end: 0" in out
    assert re.search(r"hit latency, wait_ms: p50 \d+ +p90 \d+ +p99 \d+ +max \d+", out)
    # the demo's worker is gone: nobody consumes late_obs any more
    assert quick_status("--check").exit_code == 1


def test_demo_runs_on_a_private_redis_whatever_the_environment_says(r: redis.Redis, env: dict[str, str]) -> None:
    """The operator's env file sourced (REDIS_URL and CELERY_BROKER_URL pointing at a live Redis): the demo still
    starts its own redis-server and writes nothing where the environment points."""
    if not shutil.which("redis-server"):
        cannot_run("needs redis-server on PATH")
    done = run_cli(env, "demo", "--seconds", "1", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    port = re.search(r"started a private redis-server on port (\d+)", done.stderr).group(1)
    report = json.loads(done.stdout)
    assert report["coverage"]["publish_plan_post"]["total"] == report["published"] > 0
    assert report["redis_url"] == f"redis://127.0.0.1:{port}/0"
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=int(port), socket_connect_timeout=1).ping()  # stopped at the end
    assert r.keys("*") == [] and redis.Redis.from_url(env["CELERY_BROKER_URL"]).keys("*") == []


def test_demo_refuses_a_redis_with_a_live_worker_or_real_plans(r: redis.Redis, env: dict[str, str],
                                                               worker: Worker) -> None:
    urls = ["--redis-url", env["REDIS_URL"], "--broker-url", env["CELERY_BROKER_URL"]]
    poll(lambda: r.hlen(C.WORKERS), 10, what="the worker's heartbeat")
    done = run_cli(env, "demo", "--seconds", "1", *urls, timeout=60)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stdout + done.stderr
    assert "refusing to write demo plans" in done.stderr and worker.nodename in done.stderr
    assert not r.exists(PLAN_STREAM) and not r.exists(STREAM)
    # Without a worker, real plans in the plan stream are refused the same way.
    worker.stop()
    r.delete(C.WORKERS)
    r.xadd(PLAN_STREAM, {"plan_id": "P-20261203-1", "symbol": "BTCUSDT", "decision": "EXECUTE"})
    done = run_cli(env, "demo", "--seconds", "1", "--no-worker", *urls, timeout=60)
    assert done.returncode == 1 and f"{PLAN_STREAM} holds plans that are not a demo's" in done.stderr
    assert r.xlen(PLAN_STREAM) == 1


def test_demo_without_redis_or_redis_server_says_what_to_install(env: dict[str, str]) -> None:
    env["REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    done = run_cli({**env, "PATH": "/nonexistent"}, "demo", "--seconds", "1", timeout=30)
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "apt-get install redis-server" in done.stderr


def test_rabbitmq_unacked_count_says_what_it_needs_when_it_cannot_be_read(monkeypatch: pytest.MonkeyPatch) -> None:
    assert broker.rabbitmqctl_unacked("amqp://guest:guest@10.1.2.3:5672/h2") == (
        "unknown (the broker is not on this host: needs rabbitmqctl on 10.1.2.3 or the management API)")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert broker.rabbitmqctl_unacked("amqp://guest:guest@127.0.0.1:5672/h2") == (
        "unknown (needs rabbitmqctl or the management API)")
