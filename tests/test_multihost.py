"""Several hosts for real: a producer and two workers in their own network namespaces, with shifted clocks.

Every case publishes rounds of 14 plans (heat written 300 ms after publish for 10, never for 4) and
asserts: every admitted plan exactly one publish_plan_post entry, counters equal to the stream, inflight
back to 0, and for the plans the fault did not touch the same reason, wait_ms and deciding-look time within
20 ms of the unshifted baseline run (run once per module). Figures are printed (``pytest -s``) as
``MULTIHOST`` lines. The harness is tests/hosts.py (namespaces, links, clocks, processes) and
tests/hosts_cases.py (invariants); the producer host runs tests/hosts_producer.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from observer_tasks.core import contract as C
from observer_tasks.core.settings import LATE_POINT
from tests.conftest import HEAT as HEAT_PREFIX
from tests.conftest import IN_CI, ROOT, PrivateRedis, Worker, cannot_run, inflight, late_entries, poll
from tests.hosts import Net, remove_stale_namespaces, require_namespaces, sh
from tests.hosts_cases import HEAT, SETTLE_S, Cluster, Outcome, check, run_round


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    require_namespaces()
    remove_stale_namespaces()
    n = Net(tmp_path_factory.mktemp("hosts"))
    try:
        n.up()
        n.start_redis().close()
        yield n
    finally:
        n.down()


def scenario(net: Net, name: str, producer: str = "", w1: str = "", w2: str = "") -> Outcome:
    cluster = Cluster(net)
    try:
        cluster.workers(w1, w2)
        prod = cluster.producer(producer)
        sent, settled = run_round(cluster, prod, name)
        heat_late = prod.quiet()["late_ms"]
        cluster.stop()  # every worker done: nothing can be added after this
        out = cluster.outcome(name, sent, heat_late)
        out.figures["settled_s"] = settled
        if os.environ.get("P28H_DUMP"):
            for plan in sorted(out.entries):
                e = out.entries[plan][0]
                print("ENTRY", plan, e["heat_reason"], e.get("wait_ms"), e.get("recorded_by"), e["debug_json"])
        return out
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def baseline(net: Net) -> Outcome:
    return scenario(net, "baseline")


@pytest.fixture
def cluster(net: Net) -> Iterator[Cluster]:
    c = Cluster(net)
    yield c
    c.close()


@pytest.mark.slow
def test_unshifted_baseline(baseline: Outcome) -> None:
    check(baseline, None)
    for plan, flag in zip(sorted(baseline.admitted), HEAT, strict=True):
        reason, wait = baseline.reason_wait(plan)
        assert reason == ("ok" if flag else "timeout"), (plan, reason)
        # Heat at 300 ms is found after it was written and before the deadline (by the wake path or a look); no
        # heat ends at MAX_WAIT, decided by the chain's look, not the sweeper. (wait is net of the fake
        # HeatBridge's own lateness; how soon after the write is the benchmark's figure.)
        by = baseline.entries[plan][0]["recorded_by"]
        assert (290 <= wait < 1000) if flag else (wait == 1000 and by == "look"), (plan, wait, by)


SHIFTS = [("producer", off) for off in ("+3s", "-3s", "+70s", "-70s")] + \
         [("w1", off) for off in ("+3s", "-3s", "+70s", "-70s")] + \
         [("opposite", "+3s"), ("opposite", "+70s")]


@pytest.mark.slow
@pytest.mark.parametrize(("who", "offset"), SHIFTS, ids=[f"{w}{o}" for w, o in SHIFTS])
def test_shifted_clocks_give_the_unshifted_outcomes(net: Net, baseline: Outcome, who: str, offset: str) -> None:
    opposite = ("-" if offset[0] == "+" else "+") + offset[1:]
    name = f"clock-{who}-{'ahead' if offset[0] == '+' else 'behind'}{offset[1:-1]}"
    out = scenario(net, name, producer=offset if who == "producer" else "",
                   w1=offset if who in ("w1", "opposite") else "", w2=opposite if who == "opposite" else "")
    # A worker's wall clock times its countdowns (Celery's ETA), so a skewed worker may run a timeout's
    # deciding look late by up to the skew: the reason and wait_ms must not change; the moment may.
    # With worker clocks apart, kombu's unacked restore (timed on the restoring worker's clock) redelivers
    # the other worker's held messages at once: the extra looks load the two shared cores, and a hit's lag
    # behind its write was measured at 25-39 ms in some runs (opposite +-70 s), and a producer-behind-3s
    # timeout's deciding look 142 ms late in one: scheduling on the loaded cores. A clock that counted
    # would move wait_ms or (producer) late_ms by the whole shift, so the bound is derived from the shift.
    shift_ms = int(abs(float(offset[:-1])) * 1000)
    check(out, baseline, compare_late=who == "producer", tolerance_ms=shift_ms // 2)


def broker_times(cluster: Cluster) -> tuple[float, float]:
    """The visibility timeout and restore interval the workers run with (their own celeryconfig)."""
    code = ("import observer_tasks.core.celeryconfig as c; o = c.broker_transport_options; "
            "print(o['visibility_timeout'], o.get('unacked_restore_interval', 0))")
    res = subprocess.run(["ip", "netns", "exec", cluster.net.ns("w2"), sys.executable, "-c", code],
                         env=cluster.env, cwd=ROOT, capture_output=True, text=True, timeout=30, check=True)
    vt, interval = res.stdout.split()
    return float(vt), float(interval)


def clients_of(cluster: Cluster, role: str) -> list[dict[str, str]]:
    addr = cluster.net.addr(role) + ":"
    return [c for c in cluster.data.client_list() if c.get("addr", "").startswith(addr)]


@pytest.mark.slow
def test_worker_link_cut_longer_than_the_visibility_timeout(cluster: Cluster, baseline: Outcome) -> None:
    vt, restore_every = broker_times(cluster)
    cluster.workers()
    prod = cluster.producer()
    sent = prod.round("cutA", HEAT)["results"]  # plans under observation on both workers...
    cut_ms = redis_ms(cluster.data)
    cluster.net.cut("w1")  # ...when w1's cable is cut
    cluster.cut.append("w1")
    t_cut = time.monotonic()
    held = set(cluster.broker.hkeys("unacked"))
    # Redis still answers w1's last blocking pop into the dead link; wait until it has none pending.
    poll(lambda: not any("b" in c.get("flags", "") for c in clients_of(cluster, "w1")), 5, 0.05, "w1 unblocked")
    sent_b = prod.round("cutB", HEAT)["results"]  # w2 alone
    prod.quiet()
    recorded_s = cluster.settle([p for p, r in {**sent, **sent_b}.items() if r == "enqueued"])
    # w1's unacked messages come back (visibility timeout + restore sweep) and w2 runs them.
    # Once w2 has settled every plan it acknowledged its own messages: what is left of `held` is w1's.
    held_by_w1 = held & set(cluster.broker.hkeys("unacked"))
    poll(lambda: not held_by_w1 & set(cluster.broker.hkeys("unacked")), vt + 3 * restore_every + 15, 0.2,
         "w1's unacked messages restored and consumed")
    back_s = time.monotonic() - t_cut
    # (w1 may have held nothing at the cut: the workers prefetch first messages unevenly.)
    assert not held_by_w1 or back_s > vt, "w1's messages came back before the visibility timeout"
    entries_while_cut = len(late_entries(cluster.data))
    cut_clients = {c["id"] for c in clients_of(cluster, "w1")}
    restore_ms = redis_ms(cluster.data)
    cluster.net.restore("w1")
    cluster.cut.remove("w1")
    t_restore = time.monotonic()
    poll(lambda: {c["id"] for c in clients_of(cluster, "w1")} - cut_clients, 30, 0.1, "w1 reconnected")
    reconnect_s = time.monotonic() - t_restore
    # w1 could not reach Redis for the whole cut, but w2 reached it throughout: the window was watched (by w2),
    # so it is no gap of Redis's. Once w1's heartbeat answers again it says since when it has been answering
    # (its answer after the cut), and no gap covering the cut is recorded; round C starts after that beat.
    def w1_beat() -> dict[str, int] | None:
        beats = [json.loads(raw) for name, raw in cluster.data.hgetall(C.WORKERS).items() if name.startswith(b"w1@")]
        return next((b for b in beats if int(b.get("answering_since_ms") or 0) >= restore_ms), None)

    beat = poll(w1_beat, 30, 0.05, "w1's heartbeat answering again after the cut")
    recorded_gap_s = time.monotonic() - t_restore
    spans = [tuple(int(t) for t in m.decode().split("-")) for m in cluster.data.zrange(C.GAPS, 0, -1)]
    assert not [(a, b) for a, b in spans if a <= restore_ms and b >= cut_ms], f"w1's own cut recorded as a gap: {spans}"
    gap = (cut_ms, int(beat["answering_since_ms"]))
    sent_c, _ = run_round(cluster, prod, "cutC")
    heat_late = prod.quiet()["late_ms"]
    cluster.stop()  # w1 finishes (or gives up) whatever it still held: its late records land before this returns
    out = cluster.outcome("link-cut", {**sent, **sent_b, **sent_c}, heat_late)
    w1_entries_after = sum(len(es) for es in out.entries.values()) - entries_while_cut - len(sent_c)
    out.figures.update(visibility_timeout_s=vt, held_at_cut=len(held), recorded_after_cut_s=recorded_s,
                       held_by_w1_at_cut=len(held_by_w1), redelivered_after_s=round(back_s, 1),
                       w1_reconnected_after_restore_s=round(reconnect_s, 1),
                       w1_answering_after_restore_s=round(recorded_gap_s, 1),
                       w1_away_s=round((gap[1] - gap[0]) / 1000, 1),
                       entries_added_by_w1_after_restore=w1_entries_after,
                       round_a={r: [cluster_reason(out, p) for p in sent].count(r)
                                for r in ("ok", "timeout", "redis_error")})
    check(out, baseline, touched=set(sent))
    assert w1_entries_after == 0


def cluster_reason(out: Outcome, plan: str) -> str:
    return out.entries[plan][0]["heat_reason"] if out.entries.get(plan) else "none"


@pytest.fixture(scope="module")
def rabbit_node() -> str:
    """The RabbitMQ node to restart, or skip (before any host is built): restarting a shared broker is
    opt-in outside CI. TEST_RABBIT_NODE / TEST_RABBIT_PORT / TEST_RABBIT_VHOST choose another one."""
    if os.environ.get("P28_TEST_RABBIT_RESTART") != "1" and not IN_CI:
        pytest.skip("restarts RabbitMQ (rabbitmqctl stop_app/start_app), which other test runs may share: "
                    "set P28_TEST_RABBIT_RESTART=1 (CI=true does it) to run it")
    if not shutil.which("rabbitmqctl"):
        cannot_run("rabbitmqctl is not installed")
    node, vhost = os.environ.get("TEST_RABBIT_NODE", ""), os.environ.get("TEST_RABBIT_VHOST", "h3")
    listed = subprocess.run(["rabbitmqctl", *(("-n", node) if node else ()), "-q", "list_vhosts"],
                            capture_output=True, text=True, timeout=60, check=False)
    if vhost not in listed.stdout.split():
        if not IN_CI:
            pytest.skip(f"RabbitMQ has no vhost {vhost!r} (TEST_RABBIT_VHOST): {listed.stderr.strip()[:200]}")
        rabbitmqctl(node, "add_vhost", vhost)  # CI's own fresh broker
        rabbitmqctl(node, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    return node


def rabbitmqctl(node: str, *args: str) -> None:
    sh("rabbitmqctl", *(("-n", node) if node else ()), *args)


def rabbit_url(net: Net) -> str:
    """RabbitMQ as the hosts reach it: directly when it listens on every interface, else through a
    forwarder on the root end of a veth in the private range (it listens on loopback only)."""
    port = int(os.environ.get("TEST_RABBIT_PORT", "5672"))
    listening = sh("ss", "-ltnH", f"sport = :{port}").stdout.split()
    everywhere = any(a in (f"0.0.0.0:{port}", f"*:{port}", f"[::]:{port}") for a in listening)
    addr = net.link_to_root() if everywhere else net.forward_to_loopback(port)[0]
    return f"amqp://guest:guest@{addr}:{port}/{os.environ.get('TEST_RABBIT_VHOST', 'h3')}"


@pytest.mark.slow
@pytest.mark.serial  # stops the RabbitMQ every other test uses: make test runs it alone
def test_rabbitmq_restarted_mid_load(rabbit_node: str, net: Net, cluster: Cluster, baseline: Outcome) -> None:
    from kombu import Connection

    node = rabbit_node

    url = rabbit_url(net)
    local = re.sub(r"@[^:/]+:", "@127.0.0.1:", url)
    with Connection(local, connect_timeout=5) as conn, contextlib.suppress(Exception):  # no queue yet
        conn.channel().queue_purge("late_obs")
    cluster.workers(CELERY_BROKER_URL=url)
    prod = cluster.producer(CELERY_BROKER_URL=url)
    sent = prod.round("rmqA", HEAT)["results"]  # under observation...
    t_stop = time.monotonic()
    try:
        rabbitmqctl(node, "stop_app")  # ...when the broker goes away
        during = prod.round("rmqB", HEAT[:4])["results"]  # refused ("error") or admitted: both must hold
    finally:
        rabbitmqctl(node, "start_app")
    t_start = time.monotonic()
    # Recovery: the first plan after start_app that is enqueued and recorded, end to end.
    k = 0

    def probe() -> bool:
        nonlocal k
        k += 1
        res = prod.round(f"rmqP{k}", [True])["results"]
        sent_probe.update(res)
        return res[f"rmqP{k}-00"] == "enqueued" and cluster.settle(list(res), 5) is not None

    sent_probe: dict[str, str] = {}
    poll(probe, 90, 0.2, "a plan published after start_app recorded")
    recovered_s = time.monotonic() - t_start
    sent_c, _ = run_round(cluster, prod, "rmqC")
    everything = {**sent, **during, **sent_probe, **sent_c}
    settled = cluster.settle([p for p, r in everything.items() if r == "enqueued"], SETTLE_S)
    heat_late = prod.quiet()["late_ms"]
    cluster.stop()
    out = cluster.outcome("rabbitmq-restart", everything, heat_late)
    out.figures.update(stopped_for_s=round(t_start - t_stop, 1), recovered_after_start_app_s=round(recovered_s, 1),
                       all_settled=settled is not None,
                       during_outage={r: list(during.values()).count(r) for r in set(during.values())})
    check(out, baseline, touched=set(sent) | set(during) | set(sent_probe))


def redis_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def test_redelivery_after_the_dedupe_ttl_writes_nothing(env: dict[str, str], tmp_path: Path) -> None:
    """Exactly once rests on the lease, not on the dedupe key's TTL (single host, private Redis)."""
    from observer_tasks import observe_late

    server = PrivateRedis(tmp_path).start()
    data = redis.Redis(port=server.port, db=0)
    broker = redis.Redis(port=server.port, db=1)
    worker: Worker | None = None
    try:
        env.update(REDIS_URL=f"redis://127.0.0.1:{server.port}/0",
                   CELERY_BROKER_URL=f"redis://127.0.0.1:{server.port}/1", P28_DEDUPE_TTL_SEC="1")
        assert observe_late("ttl-plan", "BTCUSDT", "EXECUTE") == "enqueued"
        first = poll(lambda: broker.lrange("late_obs", 0, -1), 10, what="the first message on the queue")
        data.hset(HEAT_PREFIX + "ttl-plan", mapping={"heat_level": "warm", "heat_action": "NONE"})
        worker = Worker(dict(env), ["-l", "info"], tmp_path / "worker.log").wait_ready()
        poll(lambda: len(late_entries(data)) == 1 and inflight(data) == 0, 15, what="the plan recorded")
        counters = data.hgetall(C.COUNTERS)
        recorded_at = redis_ms(data)
        poll(lambda: redis_ms(data) > recorded_at + 1500 and not data.keys(C.dedupe_key(LATE_POINT, "*")),
             10, 0.05, "the dedupe key expired")
        runs = worker.output().count("succeeded in")
        for message in first:  # the very same message, delivered again after the TTL
            broker.lpush("late_obs", message)
        poll(lambda: worker.output().count("succeeded in") >= runs + len(first), 15, 0.05, "the redelivery ran")
        worker.stop()  # nothing can be written after this
        worker = None
        assert [e["plan_id"] for e in late_entries(data)] == ["ttl-plan"]
        assert data.hgetall(C.COUNTERS) == counters
        assert inflight(data) == 0
    finally:
        if worker:
            worker.stop()
        data.close()
        broker.close()
        server.stop()
