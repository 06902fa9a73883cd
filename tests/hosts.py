"""Several "hosts" on one machine: network namespaces, a private Redis host and shifted wall clocks.

Each host is a network namespace with one veth link to a bridge in a switch namespace, addressed in a
private 10.x.y.0/24 that this module picks and creates; nothing else on the machine is touched (the only
link to the root namespace is created for the AMQP case, and carries traffic only to a forwarder this
module runs). The Redis host runs a private redis-server (AOF on) bound to its namespace address; the
test itself reads it through a Unix socket, which network namespaces do not separate. Host processes
run under ``ip netns exec`` with libfaketime preloaded (``FAKETIME=+3s`` style offsets) when their wall
clock is shifted; monotonic clocks are left alone, so timeouts and sleeps keep their real length.

Names carry the pytest process id and a random tag: a crashed run never blocks the next one, and the
next run removes namespaces whose creating process is gone.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import redis

from tests.conftest import CELERY, ROOT, cannot_run, poll

PREFIX = "p28h"
LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"
#: Host roles and their address suffix in the private /24.
ROLES = {"redis": 1, "producer": 2, "w1": 3, "w2": 4}
ROOT_SUFFIX = 254
#: Put first on PYTHONPATH of shifted hosts. libfaketime 0.9.10 answers EINVAL to
#: clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME) under FAKETIME_DONT_FAKE_MONOTONIC=1, and that call
#: is how Python 3.11's time.sleep sleeps; select() waits the same real time without it. Nothing else
#: changes: the host's wall clock stays shifted and its monotonic clock stays real.
SLEEP_SHIM = """import select, time


def _sleep(seconds):
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        select.select([], [], [], left)


time.sleep = _sleep
"""


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if check and res.returncode:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({res.returncode}): {res.stderr.strip()}")
    return res


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def require_namespaces() -> None:
    """Skip (with the reason; fail under CI) where the tools, the privileges or the kernel forbid this harness."""
    for tool, package in (("ip", "iproute2"), ("redis-server", "redis-server"), ("faketime", "faketime")):
        if not shutil.which(tool):
            cannot_run(f"multi-host tests need `{tool}` (Debian package {package})")
    if not Path(LIBFAKETIME).exists():
        cannot_run(f"multi-host tests need libfaketime ({LIBFAKETIME} is missing; Debian package faketime)")
    probe = f"{PREFIX}-{os.getpid()}-probe{random.randrange(10**6)}"
    res = sh("ip", "netns", "add", probe, check=False)
    if res.returncode:
        cannot_run(f"network namespaces are not allowed here: `ip netns add` said {res.stderr.strip()!r}")
    sh("ip", "netns", "del", probe, check=False)


def remove_stale_namespaces() -> None:
    """Delete namespaces left by a run whose pytest process is gone (and the processes still in them)."""
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{PREFIX}-(\d+)-[0-9a-z]+-\w+", name)
        if not m or _pid_alive(int(m[1])):
            continue
        for pid in sh("ip", "netns", "pids", name, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        sh("ip", "netns", "del", name, check=False)


class Proc:
    """A host process in its own session, so stopping it stops everything it started."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path, pipe: bool = False) -> None:
        self.name, self.log_path = name, log
        self.log: IO[str] = open(log, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, start_new_session=True, text=True,
            stdin=subprocess.PIPE if pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipe else self.log, stderr=self.log,
        )

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        """Signal the whole session and wait until none of it is left (SIGKILL after timeout)."""
        pgid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)

        def gone() -> bool:
            self.proc.poll()
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return True
            return False

        try:
            poll(gone, timeout, 0.05, f"{self.name} to stop")
        except AssertionError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            poll(gone, 10, 0.05, f"{self.name} to die")
        for f in (self.proc.stdin, self.proc.stdout, self.log):
            if f and not f.closed:
                f.close()


class Forwarder(threading.Thread):
    """A TCP forwarder from an address in the private range to a loopback service (RabbitMQ)."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        super().__init__(name="p28h-forwarder", daemon=True)
        self.target = target
        self.server = socket.create_server(listen, reuse_port=False)
        self.server.settimeout(0.2)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                conn.close()  # the broker is down: the client sees a closed connection, as it would
                continue
            upstream.settimeout(None)
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            # Each socket is the source of exactly one pump: that pump closes it.
            src.close()

    def stop(self) -> None:
        self.stopped.set()
        self.server.close()


class Net:
    """The namespaces, links, private Redis and host processes of one test module."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        rnd = random.Random()
        self.tag = f"{os.getpid()}-{rnd.randrange(36**3):03x}"
        self.ifs = f"{PREFIX}{rnd.randrange(16**5):05x}"  # interface names stay under 16 characters
        taken = sh("ip", "-4", "route", check=False).stdout + sh("ip", "-4", "addr", check=False).stdout
        while True:
            self.subnet = f"10.{rnd.randrange(200, 250)}.{rnd.randrange(256)}"
            if f"{self.subnet}." not in taken:
                break
        self.switch = self.ns("switch")
        self.namespaces: list[str] = []
        self.procs: list[Proc] = []
        self.root_if: str | None = None
        self.forwarder: Forwarder | None = None
        self.redis_sock = str(workdir / "redis.sock")
        self.clock_checked: dict[str, float] = {}
        self.shim = workdir / "faketime-site"
        self.shim.mkdir(exist_ok=True)
        (self.shim / "sitecustomize.py").write_text(SLEEP_SHIM)

    def faked(self, env: dict[str, str], offset: str) -> dict[str, str]:
        """env for a process whose wall clock is shifted by offset."""
        path = os.pathsep.join(p for p in (str(self.shim), env.get("PYTHONPATH", "")) if p)
        return {**env, "LD_PRELOAD": LIBFAKETIME, "FAKETIME": offset, "FAKETIME_NO_CACHE": "1",
                "FAKETIME_DONT_FAKE_MONOTONIC": "1", "PYTHONPATH": path}

    # -- topology ------------------------------------------------------------------------------
    def ns(self, role: str) -> str:
        return f"{PREFIX}-{self.tag}-{role}"

    def addr(self, role: str) -> str:
        return f"{self.subnet}.{ROLES[role] if role != 'root' else ROOT_SUFFIX}"

    def up(self) -> Net:
        sh("ip", "netns", "add", self.switch)
        self.namespaces.append(self.switch)
        sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        for role, suffix in ROLES.items():
            ns = self.ns(role)
            sh("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            port, end = f"{self.ifs}{suffix}s", f"{self.ifs}{suffix}h"
            sh("ip", "-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", end, "netns", ns)
            sh("ip", "-n", self.switch, "link", "set", port, "master", "br0", "up")
            sh("ip", "-n", ns, "link", "set", end, "name", "eth0")
            sh("ip", "-n", ns, "addr", "add", f"{self.subnet}.{suffix}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        return self

    def port(self, role: str) -> str:
        """The switch-side end of a host's link."""
        return f"{self.ifs}{ROLES[role]}s"

    def cut(self, role: str) -> None:
        """Cut a host's cable: its switch port goes down, its own interface keeps its address (no carrier)."""
        sh("ip", "-n", self.switch, "link", "set", self.port(role), "down")

    def restore(self, role: str) -> None:
        sh("ip", "-n", self.switch, "link", "set", self.port(role), "up")

    def link_to_root(self) -> str:
        """A veth from the root namespace to the switch; returns the root end's address."""
        if self.root_if is None:
            self.root_if, port = f"{self.ifs}rt", f"{self.ifs}rs"
            sh("ip", "link", "add", self.root_if, "type", "veth", "peer", "name", port, "netns", self.switch)
            sh("ip", "-n", self.switch, "link", "set", port, "master", "br0", "up")
            sh("ip", "addr", "add", f"{self.addr('root')}/24", "dev", self.root_if)
            sh("ip", "link", "set", self.root_if, "up")
        return self.addr("root")

    def forward_to_loopback(self, port: int) -> tuple[str, int]:
        """Make a loopback-only service (RabbitMQ) reachable from the hosts at the root end's address."""
        addr = self.link_to_root()
        if self.forwarder is None:
            self.forwarder = Forwarder((addr, port), ("127.0.0.1", port))
            self.forwarder.start()
        return addr, port

    def down(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop(signal.SIGKILL, 5)
        if self.forwarder:
            self.forwarder.stop()
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)  # also removes the veth ends inside (and their peers)
        if self.root_if:
            sh("ip", "link", "del", self.root_if, check=False)

    # -- processes -----------------------------------------------------------------------------
    def start(self, role: str, name: str, argv: list[str], env: dict[str, str], offset: str = "",
              pipe: bool = False) -> Proc:
        """Run argv on a host, its wall clock shifted by offset (e.g. '+3s', '-70s'; '' for none)."""
        env = {k: v for k, v in env.items() if not k.startswith("FAKETIME") and k != "LD_PRELOAD"}
        if offset:
            self.check_clock(offset)
            env = self.faked(env, offset)
        proc = Proc(name, ["ip", "netns", "exec", self.ns(role), *argv], env, self.workdir / f"{name}.log", pipe)
        self.procs.append(proc)
        return proc

    def check_clock(self, offset: str) -> None:
        """Skip (fail under CI) unless libfaketime really shifts Python's time.time() (and not time.monotonic())."""
        if offset in self.clock_checked:
            return
        want = float(re.fullmatch(r"([+-]\d+)s", offset)[1])  # type: ignore[index]
        code = ("import time, datetime; m = time.monotonic(); time.sleep(0.05); "
                "print(time.time(), datetime.datetime.now().timestamp(), m, time.monotonic() - m)")
        before, mono = time.time(), time.monotonic()
        res = subprocess.run(["ip", "netns", "exec", self.ns("producer"), sys.executable, "-c", code],
                             capture_output=True, text=True, env=self.faked(dict(os.environ), offset), timeout=30,
                             check=False)
        try:
            shifted, now, their_mono, slept = (float(x) for x in res.stdout.split())
        except ValueError:
            cannot_run(f"libfaketime did not run Python ({res.stderr.strip()[-300:]!r})")
        if abs(shifted - before - want) > 1.0 or abs(now - before - want) > 1.0 or abs(their_mono - mono) > 5.0 \
                or not 0.05 <= slept < 1.0:
            cannot_run(f"libfaketime does not shift time.time() by {offset} here (got {shifted - before:+.2f}s, "
                        f"datetime {now - before:+.2f}s, monotonic moved {their_mono - mono:+.2f}s, "
                        f"sleep(0.05) took {slept:.3f}s)")
        self.clock_checked[offset] = shifted - before

    def start_redis(self) -> redis.Redis:
        """The Redis host's private server (AOF on); returns a client through its Unix socket."""
        self.start("redis", "redis-server", [
            "redis-server", "--bind", self.addr("redis"), "--port", "6379", "--unixsocket", self.redis_sock,
            "--unixsocketperm", "700", "--dir", str(self.workdir), "--save", "", "--appendonly", "yes",
            "--appendfsync", "everysec", "--protected-mode", "no",
        ], dict(os.environ))
        client = redis.Redis(unix_socket_path=self.redis_sock, socket_timeout=2)

        def up() -> bool:
            with contextlib.suppress(redis.RedisError):
                return bool(client.ping())
            return False

        poll(up, 15, 0.05, "the Redis host's redis-server")
        # The hosts reach it over the bridge (this proves the links before any case depends on them).
        reach = f"import redis; print(redis.Redis(host='{self.addr('redis')}', socket_timeout=2).ping())"
        for role in ("producer", "w1", "w2"):
            res = sh("ip", "netns", "exec", self.ns(role), sys.executable, "-c", reach, check=False)
            assert res.stdout.strip() == "True", f"{role} cannot reach the Redis host: {res.stderr[-300:]}"
        return client

    def worker(self, role: str, env: dict[str, str], offset: str = "") -> Proc:
        name = f"{role}-{len(self.procs)}"
        proc = self.start(role, name, [CELERY, "-A", "observer_tasks", "worker", "-Q", "late_obs",
                                       "-n", f"{role}@%h", "-l", "info"], env, offset)
        return proc

    @staticmethod
    def wait_ready(proc: Proc) -> None:
        """A worker is ready when Celery logs "<name> ready." (it consumes from then on)."""
        poll(lambda: proc.proc.poll() is not None or " ready." in proc.output(), 60, 0.1, f"{proc.name} ready")
        assert proc.proc.poll() is None, f"{proc.name} exited early:\n{proc.output()[-3000:]}"

    def producer(self, env: dict[str, str], offset: str = "") -> Proc:
        """tests/hosts_producer.py on the producer host, talked to through its stdin and stdout."""
        return self.start("producer", f"producer-{len(self.procs)}", [sys.executable, "-m", "tests.hosts_producer"],
                          env, offset, pipe=True)

