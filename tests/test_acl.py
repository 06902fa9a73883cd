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
from observer_tasks.core import keys as K
from observer_tasks.core.settings import Settings
from observer_tasks.core.store import Store, redis_client
from observer_tasks.ops import demo

from .conftest import ROOT, Worker, free_port, poll, scrape, stream_entries

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
#: Ports of this suite's private servers (ACL tests).
PORTS = range(int(os.environ.get("TEST_ACL_PORT_FIRST", "7400")), int(os.environ.get("TEST_ACL_PORT_LAST", "7499")))
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
        poll(lambda: b"connected" in (admin.hget(K.WORKERS, worker.nodename) or b""), 10, what="wake listener up")

        # The demo's load: its simulated HeatBridge (its own user) and apply layer (observe, observe_late as
        # observer-apply, in this process), the operator's tally reading the stream as observer-ops.
        env.update(role_env(server, "observer-apply"))
        settings = Settings.from_env()
        admin.hset(K.Keys.from_settings(settings).heat("acl-early"), mapping={"heat_level": "hot", "ts_epoch": "1"})
        assert producer.observe("acl-early", "BTCUSDT", "EXECUTE") == "ok"  # the early observer reads heat
        ops = server.client("observer-ops")
        heat_writer = server.client("heatbridge")
        bridge = demo.HeatBridge(heat_writer, K.Keys.from_settings(settings))
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
        # "deferred": a call that met a slow Redis (a loaded machine), replayed by the publisher thread.
        assert set(results["early"]) <= {"ok", "missing", "deferred"} and sum(results["early"].values()) == published
        assert set(results["late"]) <= {"enqueued", "deferred"} and sum(results["late"].values()) == published
        every_plan = sorted(f"{prefix}{n}" for n in range(published))

        def all_recorded() -> bool:
            tally.update()
            return sorted(e["plan_id"] for e in tally.late()) == every_plan

        poll(all_recorded, 30, 0.2, "every plan recorded once")
        # The sweeper too: a plan admitted whose first message is never sent.
        Store(settings, redis_client(server.url("observer-apply"), 1, "producer")).admit("acl-swept", "BTCUSDT", "")
        poll(lambda: admin.hget(K.COUNTERS, "recorded|sweep") == b"1", 30, 0.2, "the sweeper records the unsent plan")
        counts = {k.decode(): int(v) for k, v in admin.hgetall(K.COUNTERS).items()}
        print("counters:", counts)
        assert counts["recorded|wake"] > 0, "the wake listener recorded nothing under the ACL"
        assert counts["recorded|look"] + counts["recorded|wake"] == published
        late_entries = [e for e in stream_entries(admin) if e["obs_point"] == K.OBS_LATE]
        assert len(late_entries) == published + 1  # once each, the swept plan included
        assert counts[f"observed|{K.OBS_LATE}|0"] + counts[f"observed|{K.OBS_LATE}|1"] == published + 1

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
    heat_key = K.Keys.from_settings(settings).heat(f"{prefix}0")
    for user in ("observer-apply", "observer-worker", "observer-ops"):
        client = server.client(user)
        for attempt in (client.flushdb, lambda c=client: c.config_get("*"), lambda c=client: c.keys("*"),
                        lambda c=client: c.get("quantum:other:key"), lambda c=client: c.hset(heat_key, "x", "1"),
                        lambda c=client: c.delete(K.COUNTERS)):
            with pytest.raises(redis.exceptions.NoPermissionError):
                attempt()
    ops_client = server.client("observer-ops")
    with pytest.raises(redis.exceptions.NoPermissionError):
        ops_client.hincrby(K.COUNTERS, "observed|create_apply_plan|1", 1)  # the tools are read-only
    apply_client = server.client("observer-apply")
    with pytest.raises(redis.exceptions.NoPermissionError):
        apply_client.publish(f"/{BROKER_DB}.celery.pidbox", "x")  # channels: only its task.sent event
    with pytest.raises(redis.exceptions.NoPermissionError):
        apply_client.lpush("celery", "x")  # the broker's keys: only late_obs
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
    # "deferred": a round trip slower than the call's cap (a loaded machine); the publisher thread replays it and
    # meets the same refusal, counted the same way.
    assert set(calls) <= {"error", "deferred"}, calls
    counters = server.admin
    for point in (K.OBS_EARLY, K.OBS_LATE):
        poll(lambda p=point: counters.hget(K.COUNTERS, f"refused|{p}|config_error") == b"3", 5,
             what=f"{point} refusals counted as config_error")
    logged = [r.getMessage() for r in caplog.records]
    # One line from the callers (throttled) and, for replayed calls, one from the thread: each names the reply.
    refused = [m for m in logged if "refuses the apply layer's user" in m or "refused by Redis" in m]
    assert refused and all("no permissions" in m for m in refused), logged
    assert len([m for m in refused if "configuration error" in m]) <= 1, logged
    assert not [m for m in logged if "unavailable" in m], logged  # no breaker: it is no outage
    assert counters.hget(K.COUNTERS, f"refused|{K.OBS_LATE}|unavailable") is None

    # The rights back, as an operator would: ACL SETUSER (ACL LOAD would also drop the user's connections).
    script_selector = re.search(r"\((\+evalsha [^)]*)\)", ACL_FILE.read_text().splitlines()[0])
    assert script_selector, "observer-apply's first selector grants EVALSHA its keys"
    server.admin.execute_command("ACL", "SETUSER", "observer-apply", "+evalsha", f"({script_selector[1]})")
    # No breaker was opened by the refusals: the very next calls observe.
    assert producer.observe("c9", "BTCUSDT", "EXECUTE") in ("missing", "deferred")
    assert producer.observe_late("c9", "BTCUSDT", "EXECUTE") in ("enqueued", "deferred")
    poll(lambda: counters.zscore(K.INFLIGHT, "c9") is not None, 5, what="c9 admitted")


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
    poll(lambda: server.admin.zscore(K.INFLIGHT, "w9") is not None, 5, what="w9 admitted")


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
def declared_store(acl_redis: AclRedis) -> tuple[Store, redis.Redis]:
    admin = acl_redis.admin
    admin.execute_command("ACL", "SETUSER", "declared", "on", ">declared-Pw", "+@all", "&*")
    client = DeclaredKeysOnly.from_url(acl_redis.url("declared", password="declared-Pw"), socket_timeout=5)
    client.admin = admin
    return Store(Settings(late_obs_max_wait_ms=50, late_obs_poll_ms=10), client), admin


def test_admission_looks_wake_finish_and_heartbeat_touch_only_declared_keys(
        declared_store: tuple[Store, redis.Redis]) -> None:
    store, admin = declared_store
    assert store.observe_early("d1", "BTCUSDT", "EXECUTE") == "missing"
    assert store.admit("d1", "BTCUSDT", "EXECUTE").status == "admitted"
    assert store.look("d1", 1, 0).status == "pending"
    admin.hset(store.keys.heat("d1"), mapping={"heat_level": "hot", "ts_epoch": "1"})
    assert {p: o.reason for p, o in store.wake(["d1"]).items()} == {"d1": "ok"}
    assert store.look("d1", 2, 0).status == "gone"
    assert store.admit("d2", "BTCUSDT", "").status == "admitted"
    assert store.finish("d2", "redis_error", {"polls": 2, "errors": 2}).status == "recorded"
    store.heartbeat("declared@test", {"wake": "connected"}, "connected")
    assert admin.acl_log() == []


def test_the_sweep_touches_only_declared_keys(declared_store: tuple[Store, redis.Redis]) -> None:
    store, admin = declared_store
    for plan in ("s1", "s2"):
        assert store.admit(plan, "BTCUSDT", "").status == "admitted"
        admin.zadd(K.INFLIGHT, {plan: 1})  # its lease ended long ago: overdue for the sweeper
    admin.hset(K.UNSENT, "s2", "broker unavailable")
    store.sweep([])
    assert admin.zcard(K.INFLIGHT) == 0 and admin.xlen(store.keys.stream) == 2
    assert admin.acl_log() == []
