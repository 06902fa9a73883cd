"""Fixtures: a private Redis database per test and real worker processes.

Tests use database 13 for the observer's data and 14 for the broker, both
flushed before each test, so no test depends on another's data. Workers are
real ``celery -A observer_tasks worker -Q late_obs`` processes, ready when
their /metrics answers (it starts at worker_ready).

``make test`` runs the suite in three pytest-xdist processes: each takes its own
pair of databases (13/14, 11/12, 9/10), its own RabbitMQ vhost and, when
TEST_PORT_BASE is set, its own hundred ports (see ``isolate_xdist_worker``), so
they share nothing but the servers. Tests that restart a shared server, or time
calls against their cap, are marked ``serial`` and run alone afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import redis

from observer_tasks.client import producer
from observer_tasks.core import contract as C
from observer_tasks.core.settings import LATE_POINT, Settings
from observer_tasks.worker.metrics import read_counters, tally

ROOT = Path(__file__).resolve().parent.parent


def isolate_xdist_worker() -> None:
    """Under pytest-xdist, move this process's databases, vhost and port range off the other workers' (gwN:
    databases TEST_DATA_DB - 2N and TEST_BROKER_DB - 2N, vhost <TEST_AMQP_URL's or p28>-gwN, TEST_PORT_BASE +
    100N, the N-th slice of TEST_PRIVATE_PORTS), before the constants below read them. Once per process."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw") or os.environ.get("P28_TEST_ISOLATED") == worker:
        return
    n = int(worker[2:])
    os.environ["P28_TEST_ISOLATED"] = worker
    os.environ["TEST_DATA_DB"] = str(int(os.environ.get("TEST_DATA_DB", "13")) - 2 * n)
    os.environ["TEST_BROKER_DB"] = str(int(os.environ.get("TEST_BROKER_DB", "14")) - 2 * n)
    if int(os.environ["TEST_DATA_DB"]) < 0 or int(os.environ["TEST_BROKER_DB"]) < 0:
        raise RuntimeError(f"pytest-xdist worker {worker}: no Redis databases left (at most 7 workers)")
    if os.environ.get("TEST_PORT_BASE"):
        os.environ["TEST_PORT_BASE"] = str(int(os.environ["TEST_PORT_BASE"]) + 100 * n)
    if os.environ.get("TEST_PRIVATE_PORTS"):  # first-last: each worker its slice
        first, last = (int(x) for x in os.environ["TEST_PRIVATE_PORTS"].split("-"))
        size = (last - first + 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        os.environ["TEST_PRIVATE_PORTS"] = f"{first + n * size}-{first + (n + 1) * size - 1}"
    if n and shutil.which("rabbitmqctl"):
        parts = urllib.parse.urlsplit(os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"))
        base_vhost = urllib.parse.unquote(parts.path[1:]) or "/"  # the path after the first slash ("/": "/")
        vhost = f"{'p28' if base_vhost == '/' else base_vhost}-{worker}"
        listed = subprocess.run(["rabbitmqctl", "-q", "list_vhosts"], capture_output=True, text=True, timeout=60)
        if vhost not in listed.stdout.split():
            subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], capture_output=True, timeout=60)
            subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
                           capture_output=True, timeout=60)
        os.environ["TEST_AMQP_URL"] = parts._replace(path="/" + urllib.parse.quote(vhost, safe="")).geturl()


isolate_xdist_worker()
REDIS_HOST = os.environ.get("TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("TEST_REDIS_PORT", "6379"))
# Override the database numbers to run two suites side by side on one Redis.
DATA_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{os.environ.get('TEST_DATA_DB', '13')}"
BROKER_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{os.environ.get('TEST_BROKER_DB', '14')}"
#: The contract's names as the tests use them: imported from the package, never typed again.
STREAM = Settings().obs_stream
HEAT = Settings().heat_lookup_prefix
#: Short waits keep the suite quick; tests that need the defaults set their own.
FAST = {"P28_LATE_OBS_MAX_WAIT_MS": "600", "P28_LATE_OBS_POLL_MS": "50"}
CELERY = str(Path(sys.executable).with_name("celery"))
#: Servers a test must find again on the same port after a restart (Prometheus' targets, a private Redis)
#: take TEST_PORT_BASE + n when it is set (to keep one suite in its own port range), else any free port.
PORT_BASE = int(os.environ.get("TEST_PORT_BASE", "0"))


#: CI=true (set by CI services, and by .ci/run): a test that cannot run here fails the run instead of skipping,
#: so CI cannot pass without the multi-host, promtool, compose and RabbitMQ tests having run.
IN_CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")


def cannot_run(reason: str) -> NoReturn:
    """Skip with reason on a developer's machine; fail under CI (a missing tool or privilege is CI's fault)."""
    if IN_CI:
        pytest.fail(f"{reason}; CI is set, so this test must run", pytrace=False)
    pytest.skip(reason)


def poll(condition: Callable[[], Any], timeout: float = 15.0, interval: float = 0.02, what: str = "") -> Any:
    """Return condition()'s first truthy value, or fail after timeout seconds (monotonic clock)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ports_in(span: str, n: int) -> list[int]:
    """The first ``n`` free ports of ``span`` ("lo-hi"), bound as redis-server binds them (SO_REUSEADDR: a port
    in TIME_WAIT is free to it)."""
    lo, hi = (int(x) for x in span.split("-"))
    found = []
    for port in range(lo, hi + 1):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == n:
            return found
    raise RuntimeError(f"fewer than {n} free ports in {span}")


def server_port(n: int) -> int:
    """The n-th fixed port of this suite (TEST_PORT_BASE + n), or a free port when TEST_PORT_BASE is unset."""
    return PORT_BASE + n if PORT_BASE else free_port()


def scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            return str(resp.read().decode())
    except OSError:
        return None


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """The observer's environment for this test (also given to workers); edit it before use."""
    for name in list(os.environ):
        if name.startswith("P28_") or name in ("REDIS_URL", "CELERY_BROKER_URL"):
            monkeypatch.delenv(name)
    values = {"REDIS_URL": DATA_URL, "CELERY_BROKER_URL": BROKER_URL, "P28_METRICS_PORT": "0", **FAST}

    class Env(dict[str, str]):
        def __setitem__(self, key: str, value: str) -> None:
            super().__setitem__(key, value)
            monkeypatch.setenv(key, value)
            producer.reset()

        def update(self, *args: Any, **kwargs: str) -> None:  # type: ignore[override]
            for key, value in dict(*args, **kwargs).items():
                self[key] = value

    e = Env()
    for k, v in values.items():
        e[k] = v
    yield e
    producer.reset()


@pytest.fixture
def r(env: dict[str, str]) -> redis.Redis:
    """The test's data database, flushed (and the broker's database too)."""
    client = redis.Redis.from_url(DATA_URL)
    client.flushdb()
    redis.Redis.from_url(BROKER_URL).flushdb()
    return client


class Worker:
    def __init__(self, env: dict[str, str], extra_args: list[str], log_path: Path,
                 metrics_port: int | None = None) -> None:
        self.metrics_port = metrics_port or free_port()
        self.env = {**os.environ, **env, "P28_METRICS_PORT": str(self.metrics_port)}
        self.log_path = log_path
        self.log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self.hostname_prefix = f"test-{uuid.uuid4().hex[:8]}@"
        self.proc = subprocess.Popen(
            [CELERY, "-A", "observer_tasks", "worker", "-Q", "late_obs", "-n", f"{self.hostname_prefix}%h",
             *extra_args],
            cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    @property
    def nodename(self) -> str:
        return self.hostname_prefix + socket.gethostname()

    def wait_ready(self, timeout: float = 30) -> Worker:
        """Ready when /metrics answers (the services step started) and the worker answers a ping (consuming)."""
        from celery import Celery
        from kombu import pools as kombu_pools
        from kombu.exceptions import OperationalError

        poll(lambda: self.proc.poll() is not None or scrape(self.metrics_port), timeout, 0.1, "worker /metrics")
        assert self.proc.poll() is None, f"worker exited early:\n{self.output()}"
        # A throwaway app on this worker's broker for each ping: the observer's app keeps its import-time
        # broker and pools, and a connection the broker dropped must not be tried again.
        def answers() -> bool:
            # The worker's broker as it reads it (P28_LATE_OBS_BROKER_URL, CELERY_BROKER_URL, REDIS_URL); a
            # redis+sentinel:// broker goes to kombu in its own form (master name in the options).
            url, options, _ssl = Settings.from_env(self.env).celery_broker()
            ping_app = Celery(broker=url, set_as_current=False)
            ping_app.conf.broker_read_url = ping_app.conf.broker_write_url = url  # CELERY_BROKER_URL wins over broker
            ping_app.conf.broker_transport_options = options
            try:
                return bool(ping_app.control.ping([self.nodename], timeout=0.3))
            except (OSError, OperationalError, RuntimeError):
                # A connection the broker dropped (a RabbitMQ restart or a closed connection earlier in the
                # session) can sit in kombu's process-wide producer pools, shared by every app: drop them.
                kombu_pools.reset()
                return False
            finally:
                ping_app.close()

        poll(lambda: self.proc.poll() is not None or answers(), timeout, 0.05, "worker consuming")
        assert self.proc.poll() is None, f"worker exited early:\n{self.output()}"
        return self

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def stop(self, sig: int = 15, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            code = self.proc.wait(5)
        self.log.close()
        return code


@pytest.fixture
def start_worker(r: redis.Redis, env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Start real worker processes with the test's environment; all are stopped at teardown."""
    started: list[Worker] = []

    def start(*extra_args: str, wait: bool = True, metrics_port: int | None = None) -> Worker:
        w = Worker(dict(env), list(extra_args), tmp_path / f"worker{len(started)}.log", metrics_port)
        started.append(w)
        return w.wait_ready() if wait else w

    yield start
    for w in started:
        w.stop()


@pytest.fixture
def worker(start_worker: Callable[..., Worker]) -> Worker:
    return start_worker()


def stream_entries(r: redis.Redis, stream: str = STREAM) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in fields.items()} for _id, fields in r.xrange(stream)]


def late_entries(r: redis.Redis) -> list[dict[str, str]]:
    return [e for e in stream_entries(r) if e["obs_point"] == LATE_POINT]


def inflight(r: redis.Redis) -> int:
    return int(r.zcard(C.INFLIGHT))


class Counts(dict[tuple[str, ...], int]):
    """The metric families as /metrics shows them, read from Redis's counters: ``counts("p28_late_obs_dropped")``,
    ``counts("p28_heat_reason", "publish_plan_post", "ok")`` (labels in the family's order), 0 when absent."""

    def __call__(self, family: str, *labels: str) -> int:
        return self.get((family, *labels), 0)


def counters(r: redis.Redis, settings: Settings | None = None) -> Counts:
    """The one counters helper: every family's value (metrics.tally, as the collector builds them)."""
    t = tally(read_counters(r), settings or Settings.from_env())
    out = Counts({(family, *labels): n for family, samples in t.samples.items() for labels, n in samples.items()})
    out[("p28_late_obs_heat_wait_seconds_count",)] = sum(t.buckets.values())
    return out


def assert_counters_match_the_stream(r: redis.Redis) -> None:
    """p28_observed_total and p28_heat_reason_total equal what the stream holds, exactly, for every point."""
    entries, counts = stream_entries(r), counters(r)
    expected = Counter((e["obs_point"], e["heat_found"]) for e in entries)
    assert {k[1:]: v for k, v in counts.items() if k[0] == "p28_observed" and v} == dict(expected)
    expected = Counter((e["obs_point"], e["heat_reason"]) for e in entries)
    assert {k[1:]: v for k, v in counts.items() if k[0] == "p28_heat_reason" and v} == dict(expected)


def assert_exactly_once(r: redis.Redis, plans: list[str]) -> list[dict[str, str]]:
    """The one exactly-once assertion: each plan one publish_plan_post entry and no other plan one, the counters
    equal to the stream, and no lease left."""
    entries = late_entries(r)
    doubled = {p: n for p, n in Counter(e["plan_id"] for e in entries).items() if n > 1}
    assert not doubled, f"recorded twice: {doubled}"
    assert sorted(e["plan_id"] for e in entries) == sorted(plans), "missing or extra plans"
    assert_counters_match_the_stream(r)
    assert inflight(r) == 0
    return entries


def notes(r: redis.Redis, failed: bool = False) -> dict[str, str]:
    """The sweep's notes, {plan: text}: why first messages were never sent, or (``failed``) a step's last error."""
    prefix = C.FAILED if failed else C.UNSENT
    return {k.decode()[len(prefix):]: (r.get(k) or b"").decode() for k in r.scan_iter(prefix + "*")}


def lease(r: redis.Redis, plan: str) -> dict[str, Any] | None:
    """A plan's lease as the admission wrote it (contract.LEASE_FIELDS), or None when it has none."""
    raw = r.get(C.dedupe_key(LATE_POINT, plan))
    if raw is None or not raw.decode().startswith(C.LEASE + C.SEP):
        return None
    fields = raw.decode().split(C.SEP)[1:]
    return {n: (int(v) if n.endswith("_ms") else v) for n, v in zip(C.LEASE_FIELDS, fields, strict=True)}


def move_lease(r: redis.Redis, plan: str, by_ms: int) -> None:
    """Move a plan's lease (its times and its ledger score) back in time by ``by_ms``."""
    old = lease(r, plan)
    assert old is not None, f"{plan} has no lease"
    new = {n: (v - by_ms if n.endswith("_ms") else v) for n, v in old.items()}
    r.set(C.dedupe_key(LATE_POINT, plan), C.SEP.join([C.LEASE, *(str(new[n]) for n in C.LEASE_FIELDS)]))
    r.zadd(C.INFLIGHT, {plan: new["end_ms"]})


class PrivateRedis:
    """A redis-server this test owns, so it can be paused, killed and restarted."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PrivateRedis:
        # Append-only with fsync per write: a restart keeps leases, stream and queued messages.
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
             "--save", "", "--appendonly", "yes", "--appendfsync", "always"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_timeout=0.5)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        poll(up, 10, what="private redis-server up")
        return self

    def stop(self, sig: int = 15) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path).start()
    yield server
    if server.proc and server.proc.poll() is None:
        server.proc.send_signal(18)  # SIGCONT, in case a test left it paused
    server.stop()


#: A port range (e.g. 7610-7699) for tests that start several servers (tests/sentinels.py); unset: any free port.
PRIVATE_PORTS = os.environ.get("TEST_PRIVATE_PORTS", "")
AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


@pytest.fixture
def amqp_broker(env: dict[str, str]) -> str:
    """RabbitMQ as the broker, with the late_obs queue emptied."""
    from kombu import Connection

    with Connection(AMQP_URL, connect_timeout=5) as conn:
        channel = conn.channel()
        with contextlib.suppress(Exception):  # no queue yet: nothing to purge
            channel.queue_purge("late_obs")
    env["CELERY_BROKER_URL"] = AMQP_URL
    return AMQP_URL
