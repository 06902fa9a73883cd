"""The worker survives its broker's faults: real redis-servers (plain and behind Sentinel) and RabbitMQ (classic
and quorum late_obs), two real ``celery -A observer_tasks worker -Q late_obs`` processes, a steady load.

Faults on the broker's Redis (the data on a healthy server of its own, so the workers go on recording plans and
kombu goes on acknowledging their messages into the fault): a Lua script past Redis's 5 s script limit (every
other client gets BUSY until SCRIPT KILL), LOADING (DEBUG RELOAD of a dataset loaded slowly), READONLY (the
server made a replica), OOM (maxmemory reached, noeviction), its connections killed every 0.2 s; the same BUSY
behind Sentinel; two master kills a few seconds apart behind Sentinel (data and broker); and with RabbitMQ as
broker, the data Redis BUSY past the limit. As each fault begins, HeatBridge writes the waiting plans' heat: the
wake step records them and their next looks, already held by the workers, find them gone and acknowledge their
messages at once, so kombu's ack is the first command to meet the fault (how the workers died in the soak).

Each case asserts that every worker is alive with the pid it had and answers a ping again (its consumer is back on
the broker), that a fresh plan is recorded and its message taken off the broker and acknowledged, that every plan
admitted during the load ends in exactly one entry (behind Sentinel: or is counted lost), and that no log says
``Unrecoverable error``. Printed (the ``BROKER_FAULT`` lines): the fault's length and, from its end, when each
worker answered a ping and when the fresh plan was done, and what the workers' broker commands met
(docs/reliability.md#the-worker-survives-its-brokers-faults). The kombu-level cases at the end reproduce each
bug of kombu 5.7's Redis transport where it happens, with kombu's transport and with the guard's.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from observer_tasks import observe_late
from observer_tasks.client import producer
from observer_tasks.core import contract as C
from observer_tasks.core.connections import redis_client
from observer_tasks.core.settings import LATE_POINT, Settings

from .conftest import AMQP_URL, HEAT, STREAM, Worker, cannot_run, late_entries, poll
from .sentinels import SentinelGroup, _ports
from .test_quorum import apply_layer, quorum  # noqa: F401 (the fixture)
from .timing import hold

#: Looks every 200 ms, wake path on: heat written for a waiting plan is recorded by the wake step at once, and the
#: plan's next look, already held by a worker, finds it gone and acknowledges its message at once.
ENV = {"P28_LATE_OBS_MAX_WAIT_MS": "6000", "P28_LATE_OBS_POLL_MS": "200", "P28_LATE_OBS_SAFETY_POLL_MS": "200"}
#: Runs until SCRIPT KILL (read-only, so SCRIPT KILL can end it); past busy-reply-threshold (5 s) everyone else
#: gets BUSY.
ENDLESS_SCRIPT = "while true do end"
SCRIPT_LIMIT_S = 5.0
BUSY_S = 7.0  # the script's whole run: 5 s of silence, then 2 s of BUSY replies
SPELL_S = 2.5  # READONLY, OOM
LOADING_KEYS, LOADING_DELAY_US = 20000, 100  # DEBUG RELOAD loads 20k keys at 100 µs each: ~2-4 s of LOADING


class Server:
    """A redis-server this test owns (no persistence, DEBUG enabled for DEBUG RELOAD)."""

    def __init__(self, workdir: Path) -> None:
        (self.port,) = _ports(1)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir), "--enable-debug-command", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.admin = redis.Redis(port=self.port, socket_timeout=30)
        poll(lambda: _answers(self.admin), 10, what="private redis-server up")

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture(autouse=True)
def no_pooled_connections_left() -> Iterator[None]:
    """kombu keeps producer connections in process-wide pools keyed by URL: one left to a server this test stopped
    would be taken by a later test whose server got the same port (its first use: "Connection closed by server")."""
    from kombu import pools as kombu_pools

    yield
    kombu_pools.reset()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    if not shutil.which("redis-server"):
        cannot_run("redis-server is needed")
    s = Server(tmp_path)
    yield s
    s.stop()


@pytest.fixture
def data_server(tmp_path: Path) -> Iterator[Server]:
    """The observer's data on a server of its own, healthy while the broker's is not."""
    if not shutil.which("redis-server"):
        cannot_run("redis-server is needed")
    (tmp_path / "data").mkdir()
    s = Server(tmp_path / "data")
    yield s
    s.stop()


@pytest.fixture
def group(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[SentinelGroup]:
    """Master + 2 replicas + 3 sentinels (a second failover needs a replica left to promote)."""
    if not shutil.which("redis-server"):
        cannot_run("redis-server is needed")
    down_after_ms = getattr(request, "param", 1000)
    g = SentinelGroup(tmp_path, replicas=2, down_after_ms=down_after_ms).start()
    yield g
    g.stop()


# --- the faults: each calls ``begun`` once it is on, and returns the moment it ended ---------------------

def busy(admin: redis.Redis, begun: Callable[[], None] = lambda: None) -> float:
    """A script past the 5 s limit, ended with SCRIPT KILL BUSY_S after it began (5 s of silence, then BUSY)."""
    port = admin.connection_pool.connection_kwargs["port"]
    runner = threading.Thread(target=_run_endless_script, args=(port,), daemon=True)
    started = time.monotonic()
    runner.start()
    probe = redis.Redis(port=port, socket_timeout=0.5)
    poll(lambda: not _answers(redis.Redis(port=port, socket_timeout=0.05)), 5, 0.01, "the script running")
    begun()

    def refused() -> bool:
        try:
            probe.ping()
        except redis.ResponseError as exc:
            return str(exc).startswith("BUSY")
        except redis.TimeoutError:
            return False  # within the limit the server just does not answer
        return False

    poll(refused, timeout=SCRIPT_LIMIT_S + 10, interval=0.05, what="BUSY replies past the script limit")
    hold(max(0.0, started + BUSY_S - time.monotonic()), "the spell's length is the fault under test")
    redis.Redis(port=port, socket_timeout=5).script_kill()
    runner.join(10)
    return time.monotonic()


def _run_endless_script(port: int) -> None:
    with contextlib.suppress(redis.ResponseError):  # "Script killed by user with SCRIPT KILL"
        redis.Redis(port=port, socket_timeout=60).eval(ENDLESS_SCRIPT, 0)


def readonly(admin: redis.Redis, begun: Callable[[], None] = lambda: None) -> float:
    """The server made a replica of a master that never answers: writes get READONLY, data stays."""
    (nowhere,) = _ports(1)
    admin.execute_command("REPLICAOF", "127.0.0.1", str(nowhere))
    begun()
    hold(SPELL_S, "the spell's length: nothing to poll for")
    admin.execute_command("REPLICAOF", "NO", "ONE")
    return time.monotonic()


def oom(admin: redis.Redis, begun: Callable[[], None] = lambda: None) -> float:
    """maxmemory far below what is used, noeviction: every write that may grow memory gets OOM."""
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)
    begun()
    hold(SPELL_S, "the spell's length")
    admin.config_set("maxmemory", 0)
    return time.monotonic()


def loading(admin: redis.Redis, begun: Callable[[], None] = lambda: None) -> float:
    """DEBUG RELOAD of a dataset loaded slowly (20,000 keys, 100 µs each: at least 2 s): every other client gets
    LOADING until it is back."""
    admin.execute_command("DEBUG", "POPULATE", LOADING_KEYS, "filler", 16)
    admin.config_set("key-load-delay", LOADING_DELAY_US)
    admin.config_set("loading-process-events-interval-bytes", 1024)  # answer LOADING often while loading
    port = admin.connection_pool.connection_kwargs["port"]
    reload = threading.Thread(target=redis.Redis(port=port, socket_timeout=60).execute_command,
                              args=("DEBUG", "RELOAD"), daemon=True)
    reload.start()
    # INFO is answered while loading; the spell is certain (the delay per key), only seeing it in time is not.
    poll(lambda: not reload.is_alive() or admin.info("persistence").get("loading") == 1, 10, 0.01,
         "the server loading")
    begun()
    reload.join(30)
    ended = time.monotonic()
    admin.config_set("key-load-delay", 0)
    return ended


def killed(admin: redis.Redis, begun: Callable[[], None] = lambda: None) -> float:
    """Every broker connection (kombu's: named observer_tasks:broker) killed every 0.2 s: each of kombu's commands
    (BRPOP, ack, restore, publish) may meet a connection the server just closed."""
    started = time.monotonic()
    while time.monotonic() < started + SPELL_S:
        for client in admin.client_list():
            if client.get("name") == "observer_tasks:broker":
                with contextlib.suppress(redis.ResponseError):  # gone already
                    admin.client_kill_filter(_id=client["id"])
        if started:
            begun()
            begun = lambda: None  # noqa: E731
        hold(0.2, "the cadence of the kills is the fault")
    return time.monotonic()


SPELLS: dict[str, Callable[..., float]] = {"BUSY": busy, "READONLY": readonly, "OOM": oom, "LOADING": loading,
                                           "KILLED": killed}


# --- what every case checks ---------------------------------------------------------------------------------

def ping_times(workers: list[Worker], broker_url: str, since: float, timeout: float = 45) -> dict[str, float]:
    """Seconds from ``since`` until each worker answered a ping (its consumer is on the broker again)."""
    from celery import Celery
    from kombu import pools as kombu_pools

    url, options, _ssl = Settings(broker_url=broker_url).celery_broker()
    answered: dict[str, float] = {}
    names = [w.nodename for w in workers]

    def all_answer() -> bool:
        app = Celery(broker=url, set_as_current=False)
        app.conf.broker_read_url = app.conf.broker_write_url = url
        app.conf.broker_transport_options = options
        try:
            for reply in app.control.ping([n for n in names if n not in answered], timeout=0.3) or []:
                for name in reply:
                    answered.setdefault(name, time.monotonic() - since)
        except Exception:  # noqa: BLE001 (the broker may still refuse the test's own connection)
            kombu_pools.reset()
        finally:
            app.close()
        return len(answered) == len(names)

    poll(all_answer, timeout, 0.05, f"every worker answers a ping (answered: {answered})")
    return answered


def fresh_plan_recorded(data: redis.Redis, since: float, workers: list[Worker], broker: redis.Redis | None,
                        name: str = "fresh", admit: Callable[[str], str] | None = None) -> float:
    """A plan made after the fault, its heat written just after the call: recorded ``ok``, its first look run by
    a worker (the worker's log says it received the task and it succeeded: it came through the broker; the wake
    step may record the plan first, after a failover its resync often does) and, on a Redis broker, its message
    acknowledged (in neither the queue nor the unacked hash). Seconds from ``since``. ``admit`` makes the call (default:
    observe_late in this process)."""
    call = admit or (lambda plan: observe_late(plan, "BTCUSDT"))
    producer.reset()  # the apply layer's breaker may still be open from the fault: a new one, as after a restart
    # Heat after the admission: heat already there would be recorded at the admission, no task sent at all.
    data.delete(HEAT + name)
    assert poll(lambda: call(name) in ("enqueued", "deferred"), 10, 0.2, "a fresh plan admitted")
    data.hset(HEAT + name, "heat_level", "hot")
    task_id = f"p28-late-{name}"

    def done() -> dict[str, str] | None:
        try:
            entry = next((e for e in late_entries(data) if e["plan_id"] == name), None)
            if entry is None or not any(f"[{task_id}] succeeded" in w.output() for w in workers):
                return None
            if broker is not None:
                held = [*broker.lrange("late_obs", 0, -1), *broker.hvals("unacked")]
                if any(task_id.encode() in m for m in held):
                    return None
            return entry
        except redis.RedisError:
            return None

    entry = poll(done, 30, 0.05, "the fresh plan recorded, its task run and its message acknowledged")
    assert entry["heat_reason"] == "ok", entry
    done_s = time.monotonic() - since
    print(f"\nfresh plan {name}: recorded by {entry['recorded_by']}, its look done {done_s:.2f}s after the fault")
    return done_s


class Load:
    """The apply layer and HeatBridge at a steady rate while the fault goes on: two plans of three have their
    heat written just before ``observe_late`` (the admission records them: no task is sent), the third waits.
    ``heat_waiting``, called as the fault begins, writes the waiting plans' heat: their next looks, already held
    by the workers, record them and the workers acknowledge their messages into the fault (kombu's ack is the
    first broker command to meet it)."""

    def __init__(self, data: redis.Redis, prefix: str, rate: float = 20) -> None:
        self.data, self.prefix, self.rate = data, prefix, rate
        self.results: dict[str, str] = {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        start, i = time.monotonic(), 0
        while not self.stopped.is_set():
            plan = f"{self.prefix}{i}"
            if i % 3:
                with contextlib.suppress(redis.RedisError):  # the data may be on the refusing server
                    self.data.hset(HEAT + plan, "heat_level", "hot")
            self.results[plan] = observe_late(plan, "BTCUSDT")
            i += 1
            self.stopped.wait(max(0.0, start + i / self.rate - time.monotonic()))

    def heat_waiting(self) -> None:
        for i, plan in enumerate(list(self.results)):
            if i % 3 == 0:
                with contextlib.suppress(redis.RedisError):
                    self.data.hset(HEAT + plan, "heat_level", "hot")

    def __enter__(self) -> Load:
        self.thread.start()
        poll(lambda: sum(1 for e in late_entries(self.data) if e["plan_id"].startswith(self.prefix)) >= 10,
             30, 0.05, "the load's first plans recorded")
        return self

    def __exit__(self, *_: object) -> None:
        self.stopped.set()
        self.thread.join(10)

    @property
    def admitted(self) -> list[str]:
        return [p for p, r in self.results.items() if r == "enqueued"]


def settled(data: redis.Redis, plans: list[str], lost_ok: bool = False) -> dict[str, int]:
    """Every plan ends in exactly one entry (or, behind Sentinel, counted lost); their reasons."""
    def done() -> bool:
        try:
            recorded = {e["plan_id"] for e in late_entries(data)}
            lost = {p for p in plans if data.get(C.dedupe_key(LATE_POINT, p)) == C.LOST.encode()}
            return data.zcard(C.INFLIGHT) == 0 and set(plans) <= recorded | lost
        except redis.RedisError:
            return False

    try:
        poll(done, 60, 0.2, "every plan in flight recorded")
    except AssertionError:
        recorded = {e["plan_id"] for e in late_entries(data)}
        left = data.zrange(C.INFLIGHT, 0, -1, withscores=True)
        raise AssertionError(f"not recorded: {sorted(set(plans) - recorded)}; inflight: {left}; "
                             f"stream {data.xlen(STREAM)} entries, first "
                             f"{[e['plan_id'] for e in late_entries(data)][:5]}") from None
    entries = [e for e in late_entries(data) if e["plan_id"] in set(plans)]
    doubled = [p for p, n in Counter(e["plan_id"] for e in entries).items() if n > 1]
    assert not doubled, doubled
    if not lost_ok:
        assert {e["plan_id"] for e in entries} == set(plans)
    return dict(Counter(e["heat_reason"] for e in entries))


def survived(workers: list[Worker], pids: list[int]) -> None:
    for w, pid in zip(workers, pids, strict=True):
        out = w.output()
        assert w.proc.poll() is None and w.proc.pid == pid, f"worker {w.nodename} exited:\n{out[-3000:]}"
        assert "Unrecoverable error" not in out, out[-3000:]


def start_workers(start_worker: Callable[..., Worker], n: int = 2) -> tuple[list[Worker], list[int]]:
    """n workers logging at INFO (Celery's task lines show which worker ran which task)."""
    workers = [start_worker("-l", "info", wait=False) for _ in range(n)]
    for w in workers:
        w.wait_ready(60)
    return workers, [w.proc.pid for w in workers]


#: What the workers' logs say their broker commands met: Celery's lines for a failed ack, a lost consumer
#: connection and a failed reconnection, and the guard's for a delivery Redis would not record.
MET = {"acks failed": "Couldn't ack", "consumer reconnects": "Connection to broker lost",
       "reconnects failed": "consumer: Cannot connect", "delivered unrecorded": "delivered anyway"}


def report(case: str, fault_s: float, pings: dict[str, float], workers: list[Worker], fresh_s: float,
           reasons: dict[str, int]) -> None:
    ping = ", ".join(f"{pings[w.nodename]:.1f}" for w in workers)
    met = {what: sum(w.output().count(line) for w in workers) for what, line in MET.items()}
    print(f"\nBROKER_FAULT {case}: fault {fault_s:.1f}s; consuming again (ping) {ping}s after it ended; fresh plan "
          f"recorded and acknowledged {fresh_s:.1f}s after; plans in flight {reasons}; workers met {met}")


def replica_ready(group: SentinelGroup) -> bool:
    """Every sentinel names the same master and lists a live replica of it, link up, not down: a master kill now
    has a replica to promote. (Sentinel may fail over again on its own: a master that stalls for the 1 s
    down-after on this loaded machine is replaced, so the replica is whichever follows the current master.)"""
    try:
        masters = {int(group.sentinel(p).sentinel_get_master_addr_by_name("obs")[1]) for p in group.sentinel_ports}
        if len(masters) != 1:
            return False
        for sentinel in group.sentinel_ports:
            replicas = group.sentinel(sentinel).sentinel_slaves("obs")
            if not any(r["is_slave"] and not r["is_sdown"] and r.get("master-link-status") == "ok"
                       and int(r["master-port"]) in masters and group.procs[int(r["port"])].poll() is None
                       for r in replicas):
                return False
    except (redis.RedisError, TypeError, KeyError):
        return False
    return True


def in_sync(group: SentinelGroup) -> bool:
    """A replica has every write the master took so far (WAIT 1 after a write): a kill now loses at most what the
    next milliseconds bring, as asynchronous replication does (a replica's first full sync comes 5 s after it
    asks: a master killed before that takes the whole dataset with it)."""
    try:
        master = redis.Redis(port=group.master_port(), socket_timeout=3)
        master.set("test:sync", 1)
        return int(master.wait(1, 1000)) >= 1
    except (redis.RedisError, RuntimeError):
        return False


# --- the cases ----------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("reply", list(SPELLS))
def test_redis_broker_refusing(server: Server, data_server: Server, env: dict[str, str],
                               start_worker: Callable[..., Worker], reply: str) -> None:
    """The broker's redis-server refuses for a spell: BUSY (a script past the 5 s limit), READONLY, OOM or
    LOADING, under a steady load with two workers. The data (another server) stays healthy, so the workers
    go on recording plans, and kombu goes on acknowledging their messages, into the spell."""
    env.update({**ENV, "REDIS_URL": data_server.url(0), "CELERY_BROKER_URL": server.url(0)})
    data = redis.Redis.from_url(data_server.url(0))
    workers, pids = start_workers(start_worker)
    with Load(data, "b") as load:
        began = time.monotonic()
        ended = SPELLS[reply](server.admin, load.heat_waiting)
    pings = ping_times(workers, server.url(0), ended)
    fresh_s = fresh_plan_recorded(data, ended, workers, server.admin)
    reasons = settled(data, load.admitted)
    survived(workers, pids)
    report(f"{reply} redis", ended - began, pings, workers, fresh_s, reasons)


@pytest.mark.slow
@pytest.mark.parametrize("group", [10000], indirect=True)
def test_sentinel_broker_busy_past_the_script_limit(group: SentinelGroup, data_server: Server, env: dict[str, str],
                                                    start_worker: Callable[..., Worker]) -> None:
    """The same BUSY spell on the broker's master behind Sentinel (down-after 10 s, so the spell is not a
    failover; Sentinel would otherwise kill the script itself once it finds the master down)."""
    env.update({**ENV, "REDIS_URL": data_server.url(0), "CELERY_BROKER_URL": group.url(1)})
    data = redis.Redis.from_url(data_server.url(0))
    workers, pids = start_workers(start_worker)
    with Load(data, "s") as load:
        began = time.monotonic()
        ended = busy(redis.Redis(port=group.master_port()), load.heat_waiting)
    pings = ping_times(workers, group.url(1), ended)
    fresh_s = fresh_plan_recorded(data, ended, workers, redis_client(group.url(1), 2.0, "test", Settings.from_env(env)))
    reasons = settled(data, load.admitted)
    survived(workers, pids)
    report("BUSY sentinel", ended - began, pings, workers, fresh_s, reasons)


@pytest.mark.slow
def test_two_master_kills_a_few_seconds_apart(group: SentinelGroup, env: dict[str, str],
                                              start_worker: Callable[..., Worker]) -> None:
    """Data and broker behind Sentinel, two workers, the master SIGKILLed, and once the workers are back the new
    master SIGKILLed too: every worker goes through both failovers."""
    env.update({**ENV, "REDIS_URL": group.url(0), "CELERY_BROKER_URL": group.url(1)})
    data = redis_client(group.url(0), 2.0, "test", Settings.from_env(env))
    broker = redis_client(group.url(1), 2.0, "test", Settings.from_env(env))
    workers, pids = start_workers(start_worker)
    admitted: list[str] = []
    figures = []
    for kill in (1, 2):
        with Load(data, f"k{kill}-") as load:
            poll(lambda: in_sync(group), 30, 0.1, "a replica with every write of the master")
            began = time.monotonic()
            old = group.kill_master()
            group.wait_failover(old)
            ended = time.monotonic()
        admitted += load.admitted
        pings = ping_times(workers, group.url(1), ended)
        fresh_s = fresh_plan_recorded(data, ended, workers, broker, f"fresh{kill}")
        figures.append((ended - began, pings, fresh_s))
        if kill == 1:  # the second kill needs a replica left to promote, following the master, as sentinels see it
            poll(lambda: replica_ready(group), 30, 0.1, "a replica following the new master")
    reasons = settled(data, admitted, lost_ok=True)
    survived(workers, pids)
    for kill, (fault_s, pings, fresh_s) in enumerate(figures, 1):
        report(f"master kill {kill} sentinel", fault_s, pings, workers, fresh_s, reasons)


@pytest.mark.slow
def test_broker_out_past_celerys_reconnection_limit(group: SentinelGroup, env: dict[str, str],
                                                    start_worker: Callable[..., Worker]) -> None:
    """No sentinel answers for longer than Celery's default reconnection limit (``broker_connection_max_retries``,
    100 attempts, after which the worker exited with ``Unrecoverable error: OperationalError``): the worker keeps
    trying and consumes again once the sentinels are back. The URLs list seven more sentinel addresses where
    nothing listens, so that 100 attempts (ten a round, a round a second) take ~10 s here rather than ~33 s."""
    dead = _ports(7)
    hosts = ",".join(f"127.0.0.1:{p}" for p in [*group.sentinel_ports, *dead])
    env.update({**ENV, "REDIS_URL": f"redis+sentinel://{hosts}/obs/0",
                "CELERY_BROKER_URL": f"redis+sentinel://{hosts}/obs/1"})
    data = redis_client(env["REDIS_URL"], 2.0, "test", Settings.from_env(env))
    workers, pids = start_workers(start_worker, 1)
    master = redis.Redis(port=group.master_port())
    began = time.monotonic()
    for port in group.sentinel_ports:
        group.procs[port].kill()
        group.procs[port].wait(5)
    for client in master.client_list():  # the worker's connections to the master go too: it must ask a sentinel
        if client.get("name", "").startswith("observer_tasks:"):
            with contextlib.suppress(redis.ResponseError):
                master.client_kill_filter(_id=client["id"])
    attempts = lambda: workers[0].output().count("consumer: Cannot connect")  # noqa: E731
    poll(lambda: attempts() > 110 or workers[0].proc.poll() is not None, 60, 0.2,
         "more reconnection attempts than Celery's default limit")
    survived(workers, pids)
    for port in group.sentinel_ports:
        group.spawn(port, ["redis-server", str(group.workdir / f"sentinel-{port}.conf"), "--sentinel"])
    poll(group.ready, 30, 0.1, "the sentinels back")
    ended = time.monotonic()
    pings = ping_times(workers, env["CELERY_BROKER_URL"], ended)
    fresh_s = fresh_plan_recorded(data, ended, workers, redis_client(env["CELERY_BROKER_URL"], 2.0, "test",
                                                                     Settings.from_env(env)))
    survived(workers, pids)
    report(f"no sentinel for {attempts()} attempts", ended - began, pings, workers, fresh_s, {})


@pytest.mark.slow
def test_rabbitmq_broker_with_the_data_redis_busy(server: Server, env: dict[str, str], amqp_broker: str,
                                                  start_worker: Callable[..., Worker]) -> None:
    """RabbitMQ as broker (late_obs a classic queue), the data Redis BUSY past the script limit: the workers ride
    it out."""
    env.update({**ENV, "REDIS_URL": server.url(0)})
    data = redis.Redis.from_url(server.url(0))
    workers, pids = start_workers(start_worker)
    with Load(data, "q") as load:
        began = time.monotonic()
        ended = busy(server.admin)
    pings = ping_times(workers, AMQP_URL, ended)
    fresh_s = fresh_plan_recorded(data, ended, workers, None)
    reasons = settled(data, load.admitted)
    survived(workers, pids)
    report("BUSY rabbitmq-classic (data redis)", ended - began, pings, workers, fresh_s, reasons)


@pytest.mark.slow
def test_rabbitmq_quorum_broker_with_the_data_redis_busy(server: Server, quorum: dict[str, str],  # noqa: F811
                                                         start_worker: Callable[..., Worker]) -> None:
    """The same with late_obs a quorum queue (countdowns through RabbitMQ's delayed delivery); the apply layer
    runs in its own process, which reads the queue type at import as in production."""
    quorum.update({"REDIS_URL": server.url(0), "P28_LATE_OBS_MAX_WAIT_MS": "6000"})
    data = redis.Redis.from_url(server.url(0))
    workers, pids = start_workers(start_worker)
    apply_env = {**workers[0].env, "P28_METRICS_PORT": "0"}
    plans = [f"q{i}" for i in range(12)]
    for plan in plans[::2]:
        data.hset(HEAT + plan, "heat_level", "hot")
    assert apply_layer(apply_env, plans) == ["enqueued"] * len(plans)
    poll(lambda: set(plans[::2]) <= {e["plan_id"] for e in late_entries(data)}, 30, 0.05, "the hits recorded")
    began = time.monotonic()
    ended = busy(server.admin)  # the other six wait through it (6 s windows)
    pings = ping_times(workers, AMQP_URL, ended)
    fresh_s = fresh_plan_recorded(data, ended, workers, None, admit=lambda plan: apply_layer(apply_env, [plan])[0])
    reasons = settled(data, plans)
    survived(workers, pids)
    report("BUSY rabbitmq-quorum (data redis)", ended - began, pings, workers, fresh_s, reasons)


# --- kombu's bugs where they happen (kombu's transport and the guard's, on a private redis-server) -----------
# Each ``kombu`` case asserts the bug, so it fails once kombu fixes it and that part of the guard can go.

KOMBU_TRANSPORT = {"kombu": None, "guard": "observer_tasks.worker.kombu_guard:Transport"}


@contextlib.contextmanager
def held_message(server: Server, transport: str) -> Iterator[tuple[Any, Any, list[Any]]]:
    """A channel holding one delivered, unacknowledged message: (connection, channel, [message])."""
    from kombu import Connection, Consumer, Producer, Queue

    conn = Connection(server.url(0), transport=KOMBU_TRANSPORT[transport])
    queue = Queue("q")
    Producer(conn.channel()).publish({"n": 1}, routing_key="q", declare=[queue])
    channel = conn.channel()
    delivered: list[Any] = []
    Consumer(channel, [queue], callbacks=[lambda body, message: delivered.append(message)]).consume()
    conn.drain_events(timeout=5)
    assert len(delivered) == 1 and channel.qos._delivered
    try:
        yield conn, channel, delivered
    finally:
        with contextlib.suppress(Exception):
            conn.release()


def refuse(admin: redis.Redis, reply: str) -> Callable[[], None]:
    """Make the server refuse writes with ``reply`` at once; returns what ends it."""
    port = admin.connection_pool.connection_kwargs["port"]
    if reply == "BUSY":
        admin.config_set("busy-reply-threshold", 100)  # BUSY after 0.1 s instead of 5 s
        runner = threading.Thread(target=_run_endless_script, args=(port,), daemon=True)
        runner.start()
        poll(lambda: not _answers(redis.Redis(port=port, socket_timeout=5)), 5, 0.02, "BUSY replies")

        def end() -> None:
            redis.Redis(port=port, socket_timeout=5).script_kill()
            runner.join(10)
        return end
    if reply == "OOM":
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        return lambda: admin.config_set("maxmemory", 0)
    (nowhere,) = _ports(1)
    admin.execute_command("REPLICAOF", "127.0.0.1", str(nowhere))
    return lambda: admin.execute_command("REPLICAOF", "NO", "ONE")


@pytest.mark.parametrize("transport", ["kombu", "guard"])
@pytest.mark.parametrize("reply", ["BUSY", "OOM", "READONLY"])
def test_kombu_ack_meeting_a_refusal(server: Server, transport: str, reply: str) -> None:
    """The ack (ZREM and HDEL of the unacked records in a transaction) meets a refusal. kombu raises a
    ResponseError, a channel error, which Celery calls unrecoverable: the worker exits. The guard's is a
    connection error: Celery logs "Couldn't ack" and goes on (the message comes back after the visibility
    timeout)."""
    with held_message(server, transport) as (conn, channel, (message,)):
        end = refuse(server.admin, reply)
        try:
            with pytest.raises(redis.ResponseError) as raised:
                message.ack()
        finally:
            end()
        assert raised.value.status_code == reply, repr(raised.value)
        assert isinstance(raised.value, conn.connection_errors) == (transport == "guard"), repr(raised.value)


@pytest.mark.parametrize("transport", ["kombu", "guard"])
def test_kombu_delivery_under_oom(server: Server, transport: str) -> None:
    """Under OOM, BRPOP still takes the message (a pop frees memory) but recording it as unacknowledged is
    refused. kombu raises (a channel error: the worker exits) and the message is gone from Redis for good; the
    guard hands it to the consumer (unrecorded, so only its plan's lease remembers it if the worker dies)."""
    from kombu import Connection, Consumer, Producer, Queue

    conn = Connection(server.url(0), transport=KOMBU_TRANSPORT[transport])
    queue = Queue("q")
    Producer(conn.channel()).publish({"n": 1}, routing_key="q", declare=[queue])
    delivered: list[Any] = []
    Consumer(conn.channel(), [queue], callbacks=[lambda body, message: delivered.append(body)]).consume()
    end = refuse(server.admin, "OOM")
    try:
        if transport == "kombu":
            with pytest.raises(redis.ResponseError) as raised:
                conn.drain_events(timeout=5)
            assert not isinstance(raised.value, conn.connection_errors)
            assert not delivered and server.admin.llen("q") == 0 and server.admin.hlen("unacked") == 0  # lost
        else:
            conn.drain_events(timeout=5)
            assert delivered == [{"n": 1}]
    finally:
        end()
        conn.release()


@pytest.mark.parametrize("transport", ["kombu", "guard"])
def test_kombu_brpop_ended_by_a_demotion(server: Server, transport: str) -> None:
    """A consumer blocked in BRPOP when its server is made a replica gets ``UNBLOCKED``: kombu raises it as a
    ResponseError (the worker exits), the guard as a connection error (Celery reconnects)."""
    from kombu import Connection, Consumer, Queue

    conn = Connection(server.url(0), transport=KOMBU_TRANSPORT[transport])
    Consumer(conn.channel(), [Queue("q")], callbacks=[lambda body, message: None]).consume()
    timer = threading.Timer(0.3, refuse, (server.admin, "READONLY"))
    timer.start()
    try:
        with pytest.raises(redis.ResponseError) as raised:
            conn.drain_events(timeout=5)
        assert "UNBLOCKED" in str(raised.value)
        assert isinstance(raised.value, conn.connection_errors) == (transport == "guard"), repr(raised.value)
    finally:
        timer.join()
        server.admin.execute_command("REPLICAOF", "NO", "ONE")
        conn.release()


@pytest.mark.parametrize("transport", ["kombu", "guard"])
def test_kombu_failover_rotation_keeps_the_transport(transport: str) -> None:
    """``Connection.switch()`` to the next ``sentinel://`` alternate: kombu's Connection replaces the configured
    transport by the URL's (``sentinel``, kombu's unguarded one); the guard's keeps it."""
    from kombu import Connection as KombuConnection

    from observer_tasks.worker.kombu_guard import SENTINEL_TRANSPORT, Connection

    cls = Connection if transport == "guard" else KombuConnection
    conn = cls("sentinel://127.0.0.1:1/4;sentinel://127.0.0.1:2/4;sentinel://127.0.0.1:3/4",
               transport=SENTINEL_TRANSPORT, transport_options={"master_name": "obs"})
    seen = []
    for _ in range(3):
        conn.maybe_switch_next()
        seen.append((conn.transport_cls, conn.port, conn.virtual_host))
    expected = SENTINEL_TRANSPORT if transport == "guard" else "sentinel"
    assert seen == [(expected, 2, "4"), (expected, 3, "4"), (expected, 1, "4")]
