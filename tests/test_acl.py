"""Least privilege: the whole pipeline under deploy/redis/users.acl, and each role refused outside it.

A private redis-server loads the shipped file (test passwords substituted) plus an admin and a stand-in
HeatBridge user. The worker runs as observer-worker, the apply layer's calls as observer-apply, the
operator's tools as observer-ops, with Redis as the broker too: the run must leave Redis's ACL LOG empty
(not one command, key or channel refused), and each role is then refused FLUSHDB, CONFIG, KEYS and keys
outside its patterns.
"""

from __future__ import annotations

import logging
import os
import random
import re
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from observer_tasks.client import producer
from observer_tasks.core import contract as C
from observer_tasks.core.connections import redis_client
from observer_tasks.core.ledger import GONE, Ledger, Pending, Recorded
from observer_tasks.core.settings import LATE_POINT, Settings
from observer_tasks.ops import demo

from .conftest import ROOT, Worker, counters, free_port, poll, scrape, stream_entries

EARLY = Settings().early_points[0]

ACL_FILE = ROOT / "deploy" / "redis" / "users.acl"
CLI = str(Path(sys.executable).with_name("observer-tasks"))
PASSWORDS = {"@APPLY_PASSWORD@": "apply-Pw-71x", "@WORKER_PASSWORD@": "worker-Pw-72y",
             "@OPS_PASSWORD@": "ops-Pw-73z"}
ROLE_PASSWORD = {"observer-apply": "apply-Pw-71x", "observer-worker": "worker-Pw-72y", "observer-ops": "ops-Pw-73z",
                 "admin": "admin-Pw-70", "heatbridge": "hb-Pw-74"}
#: Users of this test only: an admin for set-up and checks, and the simulated HeatBridge (heat and plan stream).
EXTRA_USERS = [
    "user default off",
    "user admin on >admin-Pw-70 ~* &* +@all",
    "user heatbridge on >hb-Pw-74 resetkeys resetchannels -@all +client|setname +select +ping +hset +expire +xadd"
    " ~quantum:harvest:heat:by_plan:* ~quantum:stream:apply.plan",
]
#: Ports of this suite's private servers (ACL tests): TEST_PRIVATE_PORTS (first-last) when set.
_FIRST, _LAST = (os.environ.get("TEST_PRIVATE_PORTS") or "-").split("-")
PORTS = range(int(_FIRST or os.environ.get("TEST_ACL_PORT_FIRST", "7400")),
              int(_LAST or os.environ.get("TEST_ACL_PORT_LAST", "7499")))
#: The default deployment: the broker on the observer's Redis, in its database (CELERY_BROKER_URL unset).
DATA_DB = BROKER_DB = 0


def port_in_range() -> int:
    for port in PORTS:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {PORTS}")


class AclRedis:
    def __init__(self, workdir: Path) -> None:
        text = ACL_FILE.read_text()
        for placeholder, password in PASSWORDS.items():
            text = text.replace(placeholder, password)
        self.aclfile = workdir / "users.acl"
        self.aclfile.write_text(text + "\n".join(EXTRA_USERS) + "\n")
        self.port = port_in_range()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--aclfile", str(self.aclfile), "--acllog-max-len", "1000", "--logfile", str(workdir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.admin = redis.Redis.from_url(self.url("admin"), socket_timeout=5)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server refused the ACL file:\n{(workdir / 'redis.log').read_text()}")
            try:
                return bool(self.admin.ping())
            except redis.ConnectionError:
                return False

        poll(up, 10, what="private redis-server with the ACL file")

    def url(self, user: str, db: int = DATA_DB, password: str | None = None) -> str:
        return f"redis://{user}:{password or ROLE_PASSWORD[user]}@127.0.0.1:{self.port}/{db}"

    def client(self, user: str, db: int = DATA_DB) -> redis.Redis:
        return redis.Redis.from_url(self.url(user, db), socket_timeout=5)

    def refusals(self) -> list[dict[str, Any]]:
        return [{k: entry[k] for k in ("reason", "context", "object", "username")}
                for entry in self.admin.acl_log(count=1000)]

    @contextmanager
    def explained(self) -> Iterator[None]:
        """A failed check says what Redis refused meanwhile (its ACL LOG)."""
        try:
            yield
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nRedis refused meanwhile: {self.refusals()}") from None

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[AclRedis]:
    server = AclRedis(tmp_path)
    yield server
    server.stop()


def role_env(server: AclRedis, user: str) -> dict[str, str]:
    return {"REDIS_URL": server.url(user), "CELERY_BROKER_URL": server.url(user, BROKER_DB)}


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def worker_answers(server: AclRedis, nodename: str) -> bool:
    from celery import Celery

    app = Celery(broker=server.url("observer-ops", BROKER_DB), set_as_current=False)
    try:
        return bool(app.control.ping([nodename], timeout=0.5))
    finally:
        app.close()


@pytest.mark.slow
def test_whole_pipeline_under_the_acl_then_each_role_refused_outside_it(
        env: dict[str, str], acl_redis: AclRedis, start_worker: Any) -> None:
    server = acl_redis
    with server.explained():
        env.update(role_env(server, "observer-worker"))
        worker: Worker = start_worker(wait=False)
        poll(lambda: worker.proc.poll() is not None or scrape(worker.metrics_port), 30, 0.1, "worker /metrics")
        assert worker.proc.poll() is None, worker.output()
        poll(lambda: worker_answers(server, worker.nodename), 30, 0.1, "worker consuming (ping as observer-ops)")
        admin = server.admin
        poll(lambda: b"connected" in (admin.hget(C.WORKERS, worker.nodename) or b""), 10, what="wake listener up")

        # The demo's load: its simulated HeatBridge (its own user) and apply layer (observe, observe_late as
        # observer-apply, in this process), the operator's tally reading the stream as observer-ops.
        # With the replica wait on, the outbox thread's mark and WAIT run under the ACL too (no replica here: each
        # wait is counted unreplicated).
        env.update({**role_env(server, "observer-apply"), "P28_REPLICA_WAIT_MS": "1"})
        settings = Settings.from_env()
        admin.hset(settings.heat_lookup_prefix + "acl-early", mapping={"heat_level": "hot", "ts_epoch": "1"})
        assert producer.observe("acl-early", "BTCUSDT", "EXECUTE") == "ok"  # the early observer reads heat
        # ... at each configured point (round-4 migration change 6), and the admission records a plan whose heat
        # came first (change 1), with its task's events for Flower.
        assert producer.observe("acl-early", "BTCUSDT", "RECONCILE_CLOSE", obs_point=settings.early_points[1]) == "ok"
        assert producer.observe_late("acl-early", "BTCUSDT", "EXECUTE") == "enqueued"
        ops = server.client("observer-ops")
        heat_writer = server.client("heatbridge")
        bridge = demo.HeatBridge(heat_writer, settings.heat_lookup_prefix)
        bridge.start()
        prefix = "acl-demo-"
        tally = demo.Tally(ops, settings, prefix)
        results: dict[str, Counter[str]] = {"early": Counter(), "late": Counter()}
        try:
            published = demo.publish(random.Random(5), 40, 3, 150, 0.3, prefix, heat_writer, bridge, tally, results,
                                     print)
            demo.drain(settings, tally, results, published, print)
        finally:
            bridge.stop()
        assert bridge.errors == 0 and bridge.written > 0
        # "deferred": a call that met a slow Redis (a loaded machine), made by the outbox thread.
        assert set(results["early"]) <= {"ok", "missing", "deferred"} and sum(results["early"].values()) == published
        assert set(results["late"]) <= {"enqueued", "deferred"} and sum(results["late"].values()) == published
        every_plan = sorted(f"{prefix}{n}" for n in range(published))

        def all_recorded() -> bool:
            tally.update()
            return sorted(e["plan_id"] for e in tally.late()) == every_plan

        poll(all_recorded, 30, 0.2, "every plan recorded once")
        # The sweeper too: a plan admitted whose first message is never sent.
        Ledger(settings, redis_client(server.url("observer-apply"), 1, "producer")).admit("acl-swept", "BTCUSDT", "")
        poll(lambda: counters(admin)("p28_late_obs_recorded", "sweep") == 1, 30, 0.2,
             "the sweeper records the unsent plan")
        counts = counters(admin)
        print("counters:", {k: v for k, v in counts.items() if v})
        assert counts("p28_late_obs_recorded", "wake") > 0, "the wake listener recorded nothing under the ACL"
        # (+1: acl-early, recorded by its admission; demo plans whose heat came first are too.)
        assert sum(counts("p28_late_obs_recorded", path) for path in ("look", "wake", "admit")) == published + 1
        late_entries = [e for e in stream_entries(admin) if e["obs_point"] == LATE_POINT]
        assert len(late_entries) == published + 2  # once each, acl-early and the swept plan included
        assert counts("p28_observed", LATE_POINT, "0") + counts("p28_observed", LATE_POINT, "1") == published + 2
        assert counts("p28_late_obs_unreplicated", "admit") > 0 and admin.exists(C.REPLICA_MARK, C.PRODUCERS) == 2

        # Metrics over HTTP: the worker's, and the standalone exporter run as the operator.
        page = scrape(worker.metrics_port) or ""
        assert "p28_metrics_redis_up 1.0" in page and 'p28_late_obs_recorded_total{path="sweep"} 1.0' in page
        ops_env = {**role_env(server, "observer-ops"), "P28_METRICS_PORT": str(worker.metrics_port)}
        status = run_cli(ops_env, "status", "--check")
        print(status.stdout, status.stderr)
        assert status.returncode == 0 and "workers:    1 consuming late_obs" in status.stdout
        verify = run_cli(ops_env, "verify")
        print(verify.stdout, verify.stderr)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        for command in (["coverage"], ["latency"]):
            done = run_cli(ops_env, *command)
            assert done.returncode == 0, done.stdout + done.stderr
        exporter_port = free_port()
        exporter = subprocess.Popen([CLI, "metrics", "--port", str(exporter_port), "--addr", "127.0.0.1"],
                                    env={**os.environ, **ops_env}, cwd=ROOT, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        try:
            exported = poll(lambda: scrape(exporter_port), 20, 0.1, "the standalone exporter, as observer-ops")
        finally:
            exporter.terminate()
            exporter.wait(10)
        assert "p28_metrics_redis_up 1.0" in exported and 'p28_late_obs_recorded_total{path="sweep"} 1.0' in exported

    refused = server.refusals()
    assert refused == [], f"the pipeline was refused under the ACL: {refused}"
    assert "NOPERM" not in worker.output() and "can't access" not in worker.output(), worker.output()

    # Each role, refused outside its rules.
    heat_key = settings.heat_lookup_prefix + f"{prefix}0"
    for user in ("observer-apply", "observer-worker", "observer-ops"):
        client = server.client(user)
        for attempt in (client.flushdb, lambda c=client: c.config_get("*"), lambda c=client: c.keys("*"),
                        lambda c=client: c.get("quantum:other:key"), lambda c=client: c.hset(heat_key, "x", "1"),
                        lambda c=client: c.delete(C.COUNTERS)):
            with pytest.raises(redis.exceptions.NoPermissionError):
                attempt()
    ops_client = server.client("observer-ops")
    with pytest.raises(redis.exceptions.NoPermissionError):
        ops_client.hincrby(C.COUNTERS, C.early_field(EARLY, "ok"), 1)  # the tools are read-only
    apply_client = server.client("observer-apply")
    with pytest.raises(redis.exceptions.NoPermissionError):
        apply_client.publish(f"/{BROKER_DB}.celery.pidbox", "x")  # channels: only its task.sent event
    with pytest.raises(redis.exceptions.NoPermissionError):
        apply_client.lpush("celery", "x")  # the broker's keys: only late_obs
    # Each key group only with the commands its steps run on it: the wake path's health and the gaps read-only,
    # DEL on dedupe keys only, HDEL on the apply processes' entries only.
    worker_client = server.client("observer-worker")
    for attempt in (lambda: apply_client.set(C.WAKE, "1"), lambda: apply_client.zadd(C.GAPS, {"1-2": 2}),
                    lambda: apply_client.delete(C.INFLIGHT), lambda: apply_client.delete(C.UNSENT + "x"),
                    lambda: apply_client.hset(C.WORKERS, "x", "1"), lambda: apply_client.zrem(C.INFLIGHT, "x"),
                    lambda: worker_client.delete(C.INFLIGHT), lambda: worker_client.delete(C.GAPS),
                    lambda: ops_client.set(C.WAKE, "1"), lambda: ops_client.zadd(C.INFLIGHT, {"x": 1})):
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
    assert admin.hget(heat_key, "x") is None


# -- a refused user is a configuration error, not an outage ------------------------------------------------


def without_script_rights(server: AclRedis, user: str) -> None:
    """The user may no longer run the steps' scripts (EVALSHA, and the selector naming their keys)."""
    server.admin.execute_command("ACL", "SETUSER", user, "-evalsha", "clearselectors")


REFUSED_WORKERS = {
    "wrong password": ("REDIS_URL", "invalid username-password pair"),
    "wrong broker password": ("CELERY_BROKER_URL", "invalid username-password pair"),
    "no script rights": ("REDIS_URL", "no permissions"),
}


@pytest.mark.parametrize("case", list(REFUSED_WORKERS))
def test_worker_refuses_to_start_in_one_line_when_redis_refuses_its_user(
        env: dict[str, str], acl_redis: AclRedis, start_worker: Any, case: str) -> None:
    server = acl_redis
    env.update({"REDIS_URL": server.url("observer-worker"),
                "CELERY_BROKER_URL": server.url("observer-worker", BROKER_DB + 1)})
    if case == "wrong password":
        env["REDIS_URL"] = server.url("observer-worker", password="wrong-Pw")
    elif case == "wrong broker password":
        env["CELERY_BROKER_URL"] = server.url("observer-worker", BROKER_DB + 1, password="wrong-Pw")
    else:
        without_script_rights(server, "observer-worker")
    worker: Worker = start_worker(wait=False)
    assert worker.proc.wait(60) == 2
    out = worker.output()
    lines = [line for line in out.splitlines() if "refusing to start" in line]
    variable, reply = REFUSED_WORKERS[case]
    assert len(lines) == 1 and f"P2.8A.3: refusing to start: {variable}=redis://observer-worker:***@" in lines[0]
    assert reply in lines[0] and "Traceback" not in out and "P2.8A Heat Observer" not in out, out
    assert "Pw" not in out  # neither the password nor the wrong one


def test_apply_layer_counts_a_refused_user_as_config_error_and_recovers_at_the_next_call(
        env: dict[str, str], acl_redis: AclRedis, caplog: pytest.LogCaptureFixture) -> None:
    server = acl_redis
    env.update(role_env(server, "observer-apply"))
    caplog.set_level(logging.WARNING, "observer_tasks")
    without_script_rights(server, "observer-apply")
    calls = [producer.observe(f"c{i}", "BTCUSDT", "EXECUTE") for i in range(3)]
    calls += [producer.observe_late(f"c{i}", "BTCUSDT", "EXECUTE") for i in range(3)]
    # "deferred": a round trip slower than the call's cap (a loaded machine); the outbox thread makes it and
    # meets the same refusal, counted the same way.
    assert set(calls) <= {"error", "deferred"}, calls
    admin = server.admin
    for point in (EARLY, LATE_POINT):
        poll(lambda p=point: admin.hget(C.COUNTERS, C.refused_field(p, "config_error")) == b"3", 5,
             what=f"{point} refusals counted as config_error")
    logged = [r.getMessage() for r in caplog.records]
    # One line from the callers (throttled) and, for replayed calls, one from the thread: each names the reply.
    refused = [m for m in logged if "refuses the apply layer's user" in m or "refused by Redis" in m]
    assert refused and all("no permissions" in m for m in refused), logged
    assert len([m for m in refused if "configuration error" in m]) <= 1, logged
    assert not [m for m in logged if "unavailable" in m], logged  # no breaker: it is no outage
    assert admin.hget(C.COUNTERS, C.refused_field(LATE_POINT, "unavailable")) is None

    # The rights back, as an operator would: ACL SETUSER with the user's selectors from the file (ACL LOAD would
    # also drop the user's connections). (The file now gives the apply user one selector per key group, e.g. DEL
    # on dedupe keys only, so all of them come back, not only the first.)
    selectors = re.findall(r"\(([^)]*)\)", ACL_FILE.read_text().splitlines()[0])
    assert selectors[0].startswith("+evalsha "), "observer-apply's first selector grants EVALSHA its keys"
    server.admin.execute_command("ACL", "SETUSER", "observer-apply", "+evalsha", *(f"({s})" for s in selectors))
    # No breaker was opened by the refusals: the very next calls observe.
    assert producer.observe("c9", "BTCUSDT", "EXECUTE") in ("missing", "deferred")
    assert producer.observe_late("c9", "BTCUSDT", "EXECUTE") in ("enqueued", "deferred")
    poll(lambda: admin.zscore(C.INFLIGHT, "c9") is not None, 5, what="c9 admitted")


def test_apply_layer_with_a_wrong_password_logs_a_configuration_error(
        env: dict[str, str], acl_redis: AclRedis, caplog: pytest.LogCaptureFixture) -> None:
    server = acl_redis
    env.update(role_env(server, "observer-apply"))
    env["REDIS_URL"] = server.url("observer-apply", password="wrong-Pw")
    caplog.set_level(logging.WARNING, "observer_tasks")
    calls = [producer.observe_late(f"w{i}", "BTCUSDT") for i in range(3)]
    assert set(calls) <= {"error", "deferred"}, calls  # deferred: see the test above

    def refused() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if "refuses the apply layer's user" in r.getMessage() or "refused by Redis" in r.getMessage()]

    lines = poll(refused, 10, what="the refusal logged")
    assert all("invalid username-password pair" in m for m in lines) and "Pw" not in caplog.text
    # The password the apply layer uses is added to the user: the next call is admitted, no breaker to wait out.
    server.admin.execute_command("ACL", "SETUSER", "observer-apply", ">wrong-Pw")
    assert producer.observe_late("w9", "BTCUSDT") in ("enqueued", "deferred")
    poll(lambda: server.admin.zscore(C.INFLIGHT, "w9") is not None, 5, what="w9 admitted")


@pytest.mark.parametrize("case", ["ok", "wrong password", "no script rights"])
def test_config_check_names_a_refused_user(env: dict[str, str], acl_redis: AclRedis, case: str) -> None:
    server = acl_redis
    values = role_env(server, "observer-worker")
    if case == "wrong password":
        values["REDIS_URL"] = server.url("observer-worker", password="wrong-Pw")
    elif case == "no script rights":
        without_script_rights(server, "observer-worker")
    done = run_cli(values, "config", "check")
    if case == "ok":
        assert done.returncode == 0, done.stderr
        return
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "REDIS_URL=redis://observer-worker:***@" in done.stderr and "Redis refuses the user" in done.stderr
    assert ("WRONGPASS" in done.stderr or "invalid username-password" in done.stderr) if case == "wrong password" \
        else "no permissions" in done.stderr


# -- each role may run every branch of the steps it runs, and nothing refuses it ---------------------------


def test_each_role_runs_every_branch_of_its_steps_under_the_acl(acl_redis: AclRedis) -> None:
    """The apply user's and the worker's steps, every branch (their undo on a failed write included), and the
    commands around them, run as their users: Redis's ACL LOG stays empty. (The pipeline test above runs what a
    healthy day runs; this one what a bad day runs too.)"""
    server, admin = acl_redis, acl_redis.admin
    settings = Settings(late_obs_max_wait_ms=60_000, late_obs_poll_ms=10, late_obs_max_inflight=1, replica_wait_ms=1)
    apply = Ledger(settings, redis_client(server.url("observer-apply"), 5, "producer"))
    worker = Ledger(settings, redis_client(server.url("observer-worker"), 5, "worker"))
    heat = settings.heat_lookup_prefix
    with server.explained():
        # The apply layer: early (found, missing, stale, duplicate), admissions (admitted, kept, duplicate,
        # dropped, backlog, recorded at once: heat first or held past its window), and what its outbox runs.
        admin.hset(heat + "a1", "heat_level", "hot")
        assert [apply.early("a1", "X", "", point) for point in settings.early_points] == ["ok", "ok"]
        assert apply.early("a2", "X", "", EARLY, stale=True) == "redis_error"
        assert apply.early("a2", "X", "", EARLY) == "duplicate"
        live = apply.admit("l1", "X", "", "t1")
        assert (live.status, apply.admit("l1", "X", "", "t1").status, apply.admit("l1", "X", "", "t2").status) == (
            "admitted", "kept", "duplicate")
        assert apply.admit("l2", "X", "").status == "dropped"
        assert apply.admit("a1", "X", "", "t3").status == "recorded"  # heat first
        assert apply.admit("held", "X", "", "t4", age_ms=120_000).reason == "redis_error"
        admin.hset(heat + "held-heat", "heat_level", "hot")  # unstamped heat cannot prove it: the gaps are read
        assert apply.admit("held-heat", "X", "", "t7", age_ms=120_000).reason == "redis_error"
        admin.zadd(C.INFLIGHT, {"l1": 1})  # l1 waits past its lease for a worker: the next is refused
        assert apply.admit("l3", "X", "").status == "backlog"
        apply.count({C.refused_field(EARLY, "given_up"): 1})
        apply.note({"l1": "first-message queue full"})
        apply.report("host:1", {"pid": 1})
        assert apply.replicated_after_write() is False  # no replica: the mark written, WAIT answered 0
        assert apply.client.exists(C.WAKE) == 0  # the sender's read of the wake path's health
        # Records that fail after their first writes (a corrupt counter): not NOPERM, so their undo ran.
        admin.hset(C.COUNTERS, mapping={C.WAIT_SUM_MS: "not a number", C.early_field(EARLY, "ok"): "not a number"})
        admin.hset(heat + "u1", "heat_level", "hot")
        with pytest.raises(redis.ResponseError, match="not an integer"):
            apply.admit("u1", "X", "", "t5")
        with pytest.raises(redis.ResponseError, match="not an integer"):
            apply.early("u1", "X", "", EARLY)
        admin.hdel(C.COUNTERS, C.WAIT_SUM_MS, C.early_field(EARLY, "ok"))
        assert not admin.exists(apply.lease_key("u1"), C.dedupe_key(EARLY, "u1"))
        # The worker: looks (pending, recorded, gone, lost), finish, wake, sweep, heartbeat (with a gap), its
        # counts and notes, the wake resync's list, the metrics' reads, the start-up check.
        admin.delete(apply.lease_key("l1"))  # l1's admission vanished (a failover): its look counts it lost
        admin.zrem(C.INFLIGHT, "l1")
        w = apply.admit("w1", "X", "", "t6")
        assert w.status == "admitted"
        assert isinstance(worker.look("w1", 1, 0, w.deadline_ms), Pending)
        assert worker.leased_plans() == ["w1"]
        admin.hset(C.COUNTERS, C.WAIT_SUM_MS, "not a number")
        admin.hset(heat + "w1", "heat_level", "hot")
        with pytest.raises(redis.ResponseError, match="not an integer"):
            worker.look("w1", 2, 0, w.deadline_ms)
        with pytest.raises(redis.ResponseError, match="not an integer"):  # the batch's counters: all undone
            worker.wake(["w1"])
        assert worker.lease_key("w1") and apply.admit("w1", "X", "", "t6").status == "kept"  # still leased
        admin.hdel(C.COUNTERS, C.WAIT_SUM_MS)
        assert worker.wake(["w1"]).recorded["w1"].reason == "ok"
        assert worker.look("w1", 3, 0, w.deadline_ms) == GONE
        assert worker.look("l1", 1, 0, live.deadline_ms) == "lost"
        assert apply.admit("f1", "X", "", "f1").status == "admitted"
        assert isinstance(worker.finish("f1", "redis_error", 2), Recorded)
        assert apply.admit("s1", "X", "", "s1").status == "admitted"
        admin.zadd(C.INFLIGHT, {"s1": 1})  # its lease ended long ago: overdue for the sweeper
        admin.zadd(C.INFLIGHT, {"junk": 1})
        admin.set(worker.lease_key("junk"), "not a lease")
        swept = worker.sweep()
        assert sorted(swept.recorded) == ["s1"] and swept.freed == ["junk"]
        now = worker.heartbeat("w@acl", {"wake": "connected"}, "connected")
        worker.heartbeat("w@acl", {"wake": "connected"}, "connected", gap_start_ms=now - 5000)
        worker.heartbeat("w@acl", {"wake": "down"}, "down")  # the wake path unhealthy: its key deleted
        worker.count({C.WAKE_RESYNCS: 1})
        worker.note({"x": "WRONGTYPE"}, failed=True)
        pipe = worker.client.pipeline(transaction=False)
        pipe.hgetall(C.COUNTERS).zcard(C.INFLIGHT).hvals(C.WORKERS).time().zcount(C.INFLIGHT, "-inf", now)
        pipe.execute()
        worker.check_access()
        apply.check_access()
        assert server.refusals() == []


# -- every step touches only the keys it declares ---------------------------------------------------------


class DeclaredKeysOnly(redis.Redis):
    """A client whose user may touch exactly the keys of the script call it is making (set just before it):
    any key a script reaches without naming it in KEYS is refused (NOPERM inside the script)."""

    admin: redis.Redis

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:  # type: ignore[override]
        keys = [k.decode() if isinstance(k, bytes) else str(k) for k in keys_and_args[:numkeys]]
        patterns = ["~" + "".join("\\" + c if c in "*?[]\\" else c for c in k) for k in keys]
        self.admin.execute_command("ACL", "SETUSER", "declared", "resetkeys", *patterns)
        return super().evalsha(sha, numkeys, *keys_and_args)


@pytest.fixture
def declared_ledger(acl_redis: AclRedis) -> tuple[Ledger, redis.Redis]:
    admin = acl_redis.admin
    admin.execute_command("ACL", "SETUSER", "declared", "on", ">declared-Pw", "+@all", "&*")
    client = DeclaredKeysOnly.from_url(acl_redis.url("declared", password="declared-Pw"), socket_timeout=5)
    client.admin = admin
    return Ledger(Settings(late_obs_max_wait_ms=50, late_obs_poll_ms=10), client), admin


def test_admission_looks_wake_finish_and_heartbeat_touch_only_declared_keys(
        declared_ledger: tuple[Ledger, redis.Redis]) -> None:
    ledger, admin = declared_ledger
    for point in ledger.settings.early_points:
        assert ledger.early("d1", "BTCUSDT", "EXECUTE", point) == "missing"
    assert ledger.early("d0", "BTCUSDT", "EXECUTE", EARLY, stale=True) == "redis_error"
    d1 = ledger.admit("d1", "BTCUSDT", "EXECUTE", "t1")
    assert d1.status == "admitted" and ledger.admit("d1", "BTCUSDT", "EXECUTE", "t1").status == "kept"
    assert isinstance(ledger.look("d1", 1, 0, d1.deadline_ms), Pending)
    admin.hset(ledger.heat_key("d1"), mapping={"heat_level": "hot", "ts_epoch": "1"})
    assert {p: o.reason for p, o in ledger.wake(["d1"]).recorded.items()} == {"d1": "ok"}
    assert ledger.look("d1", 2, 0, d1.deadline_ms) == GONE
    d2 = ledger.admit("d2", "BTCUSDT", "")
    assert d2.status == "admitted" and isinstance(ledger.finish("d2", "redis_error", 2), Recorded)
    admin.hset(ledger.heat_key("d3"), "heat_level", "warm")  # heat first: recorded by the admission
    assert ledger.admit("d3", "BTCUSDT", "", "t3").status == "recorded"
    assert ledger.admit("d4", "BTCUSDT", "", "t4", age_ms=5000).reason == "redis_error"  # held past its window
    admin.delete(ledger.lease_key("d2"))
    assert ledger.look("d2", 3, 0, d2.deadline_ms) == "lost"
    ledger.heartbeat("declared@test", {"wake": "connected"}, "connected")
    ledger.heartbeat("declared@test", {"wake": "connected"}, "connected", gap_start_ms=d1.published_ms)
    ledger.count({C.refused_field(EARLY, "invalid_input"): 1})
    ledger.note({"d9": "first-message queue full"})
    ledger.report("host:1", {"pid": 1})
    ledger.check_access()
    assert admin.acl_log() == []


def test_the_sweep_touches_only_declared_keys(declared_ledger: tuple[Ledger, redis.Redis]) -> None:
    ledger, admin = declared_ledger
    for plan in ("s1", "s2", "s3"):
        assert ledger.admit(plan, "BTCUSDT", "").status == "admitted"
        admin.zadd(C.INFLIGHT, {plan: 1})  # its lease ended long ago: overdue for the sweeper
    admin.set(C.UNSENT + "s2", "broker unavailable")
    admin.set(ledger.lease_key("s3"), "not a lease")  # freed
    admin.zadd(C.INFLIGHT, {"not a plan id": 1})
    swept = ledger.sweep()
    assert sorted(swept.recorded) == ["s1", "s2"] and sorted(swept.freed) == ["not a plan id", "s3"]
    assert admin.zcard(C.INFLIGHT) == 0 and admin.xlen(ledger.settings.obs_stream) == 2
    assert admin.acl_log() == []
