"""The soak's Redis: a master, one replica and three sentinels on loopback (tests/sentinels.py's group, with AOF
on and Sentinel's down-after chosen by the run), and the three Redis faults.

- ``stall``: the master SIGSTOPped for less than down-after, then SIGCONTed (no failover);
- ``kill_and_fail_over``: the master SIGKILLed, Sentinel promotes the replica, and the old master is started
  again (same port, same AOF folder) as a replica of the new one, so the next kill has a replica to promote;
- ``busy``: a Lua busy loop sent with EVAL by a separate client; past Redis's script limit (5 s) every other
  client gets ``BUSY``; ended with SCRIPT KILL after the spell's length (or earlier by Sentinel, which sends
  SCRIPT KILL itself to a master that has answered BUSY for down-after).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import redis
from redis.driver_info import DriverInfo

from ..conftest import poll
from ..sentinels import SentinelGroup
from ..timing import hold

SERVICE = "mymaster"
#: The busy loop: reads TIME until ARGV[1] seconds have passed (a bound in case SCRIPT KILL never comes).
#: It writes nothing, so SCRIPT KILL can end it.
BUSY_LUA = """
local t0 = tonumber(redis.call('TIME')[1])
while tonumber(redis.call('TIME')[1]) - t0 < tonumber(ARGV[1]) do end
return 'ran out'
"""


class ChaosCluster(SentinelGroup):
    """Master + one replica + three sentinels; ``url(db)`` is the observer's ``redis+sentinel://`` URL."""

    def __init__(self, workdir: Path, ports: list[int], down_after_ms: int) -> None:
        super().__init__(workdir, 1, service=SERVICE, down_after_ms=down_after_ms, aof=True, ports=ports)

    def spawn(self, port: int, argv: list[str]) -> None:
        """Start a server; a restarted one appends to its earlier log."""
        with open(self.workdir / f"{port}.log", "ab") as log:  # the child keeps its own descriptor
            self.procs[port] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    @property
    def sentinel_addrs(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", p) for p in self.sentinel_ports]

    @staticmethod
    def direct(port: int, timeout: float | None = 0.5) -> redis.Redis:
        # No CLIENT SETINFO on connect: a connection made during a BUSY spell must get through to SCRIPT KILL.
        return redis.Redis(port=port, socket_timeout=timeout, socket_connect_timeout=1, decode_responses=True,
                           driver_info=DriverInfo(name=None, lib_version=None))

    def stall(self, seconds: float) -> dict[str, Any]:
        """SIGSTOP the master for ``seconds`` (the fault's length, chosen shorter than down-after)."""
        port = self.master_port()
        proc = self.procs[port]
        proc.send_signal(signal.SIGSTOP)
        try:
            hold(seconds, "the stall itself")
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
        return {"port": port}

    def healthy(self) -> bool:
        """Every sentinel names one master and sees it plainly up (no s_down, o_down or failover in progress),
        the server is a master, and the other server is its in-sync replica."""
        try:
            states: list[Any] = [self.sentinel(p).sentinel_master(self.service) for p in self.sentinel_ports]
        except (redis.RedisError, TypeError):
            return False
        named = {int(state["port"]) for state in states}
        if len(named) != 1 or any(state["flags"] != "master" for state in states):
            return False
        (master,) = named
        try:
            if self.direct(master).info("replication").get("role") != "master":
                return False
        except redis.RedisError:
            return False
        return all(self.replica_synced(p, master) for p in self.server_ports if p != master)

    def wait_healthy(self, cap_s: float = 120) -> float:
        """Seconds until healthy(): a Redis fault starts on a healthy group (so a kill has a replica to promote
        that holds the data) and a fault that made Sentinel fail over ends when the group is whole again."""
        t0 = time.monotonic()
        poll(self.healthy, cap_s, 0.1, "the Redis group healthy (one master, its replica in sync)")
        return round(time.monotonic() - t0, 2)

    def kill_and_fail_over(self) -> dict[str, Any]:
        """SIGKILL the master, wait for Sentinel's promotion, start the old master as a replica of the new one."""
        t0 = time.monotonic()
        old = self.kill_master()
        new = self.wait_failover(old, timeout=self.down_after_ms / 1000 + 60)
        promoted = time.monotonic() - t0
        self.spawn(old, self.server_argv(old, replicaof=new))
        poll(lambda: self.replica_synced(old, new), 60, 0.1, f"old master {old} back as a replica of {new}")
        return {"old": old, "new": new, "promoted_after_s": round(promoted, 2),
                "replica_back_after_s": round(time.monotonic() - t0, 2)}

    def replica_synced(self, port: int, master: int) -> bool:
        try:
            info = self.direct(port).info("replication")
        except redis.RedisError:
            return False
        return bool(info.get("role") == "slave" and int(info.get("master_port", 0)) == master
                    and info.get("master_link_status") == "up")

    def busy(self, seconds: float) -> dict[str, Any]:
        """A script busy for ``seconds`` on the master (BUSY for everyone else past 5 s), then SCRIPT KILL."""
        port = self.master_port()
        outcome: dict[str, Any] = {"port": port}

        def run() -> None:
            try:
                outcome["reply"] = str(self.direct(port, timeout=seconds + 60).eval(BUSY_LUA, 0, int(seconds) + 30))
            except redis.RedisError as exc:
                outcome["reply"] = f"{type(exc).__name__}: {exc}"

        runner = threading.Thread(target=run, name="chaos-busy", daemon=True)
        runner.start()
        hold(seconds, "the spell itself")
        try:
            self.direct(port, timeout=2).script_kill()
            outcome["ended_by"] = "harness SCRIPT KILL"
        except redis.ResponseError as exc:  # NOTBUSY: Sentinel killed it first
            outcome["ended_by"] = f"already ended ({exc})"
        except redis.RedisError as exc:
            outcome["ended_by"] = f"SCRIPT KILL failed ({type(exc).__name__}: {exc})"
        runner.join(10)
        # Past down-after Sentinel fails over while the old master lives on (it is demoted ~10 s later): the
        # spell is over when the group is whole again, whichever server is master then.
        outcome["healthy_after_s"] = self.wait_healthy()
        if self.master_port() != port:
            outcome["failover_to"] = self.master_port()
        return outcome

    def master_alive(self) -> bool:
        try:
            return bool(self.direct(self.master_port()).ping())
        except (redis.RedisError, RuntimeError):
            return False

    def stop(self) -> None:
        for proc in self.procs.values():  # a stopped process must be continued to die cleanly
            with contextlib.suppress(ProcessLookupError, OSError):
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGCONT)
        super().stop()
