"""A private Redis master, replicas and three sentinels on loopback, owned by one test.

Ports come from TEST_PRIVATE_PORTS (e.g. ``7610-7699``) when it is set, so suites side by side keep to their
own range; otherwise from the kernel's free ports. Every process is killed when the group stops.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis

from .conftest import PRIVATE_PORTS, free_port, poll, ports_in

SERVICE = "obs"
#: Sentinel's own timings: a master silent this long is down (ms); a failover gives up after this (ms).
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000


def _ports(n: int) -> list[int]:
    return ports_in(PRIVATE_PORTS, n) if PRIVATE_PORTS else [free_port() for _ in range(n)]


def up(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


class SentinelGroup:
    """Master + ``replicas`` replicas + 3 sentinels; ``url(db)`` is the observer's redis+sentinel:// URL."""

    def __init__(self, workdir: Path, replicas: int = 1, *, service: str = SERVICE,
                 down_after_ms: int = DOWN_AFTER_MS, aof: bool = False, ports: list[int] | None = None) -> None:
        self.workdir = workdir
        self.service, self.down_after_ms, self.aof = service, down_after_ms, aof
        ports = ports or _ports(1 + replicas + 3)
        self.server_ports, self.sentinel_ports = ports[:1 + replicas], ports[1 + replicas:]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def url(self, db: int = 0) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.service}/{db}"

    def server_argv(self, port: int, replicaof: int | None = None) -> list[str]:
        """A data server's command line (append-only, one AOF folder per port, when the group has ``aof``)."""
        persistence = ["--appendonly", "yes", "--appenddirname", f"aof-{port}", "--appendfsync", "everysec"] \
            if self.aof else ["--appendonly", "no"]
        replica = ["--replicaof", "127.0.0.1", str(replicaof)] if replicaof else []
        # No diskless-sync delay (5 s by default): a replica is in sync, and the group ready, at once.
        return ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", *persistence,
                "--repl-diskless-sync-delay", "0",
                "--dir", str(self.workdir), "--dbfilename", f"{port}.rdb", *replica]

    def start(self) -> SentinelGroup:
        master = self.server_ports[0]
        for port in self.server_ports:
            self.spawn(port, self.server_argv(port, master if port != master else None))
        for port in self.server_ports:
            poll(lambda p=port: up(p), 10, what=f"redis-server {port}")  # type: ignore[misc]
        for port in self.sentinel_ports:
            conf = self.workdir / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.workdir}\n"
                f"sentinel monitor {self.service} 127.0.0.1 {master} 2\n"
                f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.service} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {self.service} 1\n")
            self.spawn(port, ["redis-server", str(conf), "--sentinel"])
        poll(self.ready, 20, 0.1, "sentinels agree on the master and see its replicas and each other")
        return self

    def spawn(self, port: int, argv: list[str]) -> None:
        with open(self.workdir / f"{port}.log", "wb") as log:  # the child keeps its own descriptor
            self.procs[port] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    def sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=0.5, decode_responses=True)

    def ready(self) -> bool:
        try:
            for port in self.sentinel_ports:
                state = self.sentinel(port).sentinel_master(self.service)
                if (int(state["port"]) != self.master_port() or int(state["num-slaves"]) < len(self.server_ports) - 1
                        or int(state["num-other-sentinels"]) < 2):
                    return False
            # Each replica in sync (not still waiting for its first full sync): a kill then has a replica to
            # promote that holds the data, and a replica wait is acknowledged from the first call.
            info = redis.Redis(port=self.master_port(), socket_timeout=0.5).info("replication")
            online = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)
                      and v.get("state") == "online"]
            if len(online) < len(self.server_ports) - 1:
                return False
        except redis.RedisError:
            return False
        return True

    def master_port(self) -> int:
        """The port the sentinels name as master (the first that answers)."""
        for port in self.sentinel_ports:
            try:
                return int(self.sentinel(port).sentinel_get_master_addr_by_name(self.service)[1])
            except (redis.RedisError, TypeError):
                continue
        raise RuntimeError("no sentinel answers")

    def kill_master(self) -> int:
        """SIGKILL the current master; returns its port."""
        port = self.master_port()
        self.procs[port].kill()
        self.procs[port].wait(5)
        return port

    def wait_failover(self, old: int, timeout: float = 30) -> int:
        """The new master's port, once every sentinel names one other than ``old`` and it accepts writes."""
        def promoted() -> int | None:
            try:
                ports = {int(self.sentinel(p).sentinel_get_master_addr_by_name(self.service)[1])
                         for p in self.sentinel_ports}
            except (redis.RedisError, TypeError):
                return None
            (port,) = ports if len(ports) == 1 else (None,)
            if port is None or port == old:
                return None
            info = redis.Redis(port=port, socket_timeout=0.5).info("replication")
            return port if info["role"] == "master" else None

        return int(poll(promoted, timeout, 0.05, "a new master"))

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            proc.wait(max(0.1, deadline - time.monotonic()))
