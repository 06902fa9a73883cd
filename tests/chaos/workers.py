"""The soak's workers: real ``celery -A observer_tasks worker -Q late_obs -n wN@%h`` processes (tests/conftest.py's
Worker), each with its own /metrics port, a supervisor that records every exit, and the worker faults.

Every exit is written to the harness's record (``exits.jsonl``) with ``caused``: true when the harness
killed the worker (a fault, or the teardown), false otherwise. A worker that exits on its own is started
again after RESTART_DELAY_S, as systemd's ``Restart=always`` would, so the soak goes on with two workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..conftest import Worker, poll, scrape

#: A worker that exited on its own is started again this long after (systemd's RestartSec).
RESTART_DELAY_S = 1.0
#: How long a started worker may take until its /metrics answers.
READY_TIMEOUT_S = 60.0


class Slot:
    def __init__(self, name: str, metrics_port: int) -> None:
        self.name, self.metrics_port = name, metrics_port
        self.incarnation = -1
        self.worker: Worker | None = None
        self.expected_exit = False  # the harness is killing or has killed it
        self.lock = threading.RLock()


class Workers:
    def __init__(self, env: dict[str, str], run_dir: Path, metrics_ports: list[int]) -> None:
        self.env, self.run_dir = env, run_dir
        self.slots = [Slot(f"w{i + 1}", port) for i, port in enumerate(metrics_ports)]
        self.exits_path = run_dir / "exits.jsonl"
        self.stopping = threading.Event()
        self.supervisor = threading.Thread(target=self._supervise, name="chaos-supervisor", daemon=True)
        self.on_exit: Callable[[dict[str, Any]], None] = lambda record: None

    # -- lifecycle -------------------------------------------------------------
    def start_all(self) -> None:
        for i in range(len(self.slots)):
            self.start(i)
        for i in range(len(self.slots)):
            self.wait_ready(i)
        self.supervisor.start()

    def start(self, i: int) -> Worker:
        slot = self.slots[i]
        with slot.lock:
            slot.incarnation += 1
            log = self.run_dir / f"{slot.name}-{slot.incarnation}.log"
            # The later -n wins over conftest.Worker's own test name (click keeps the last value).
            slot.worker = Worker(self.env, ["-n", f"{slot.name}@%h"], log, slot.metrics_port)
            slot.expected_exit = False
            return slot.worker

    def wait_ready(self, i: int, timeout: float = READY_TIMEOUT_S) -> float:
        """Seconds until the worker's /metrics answers (its services step started), or until it exited."""
        slot = self.slots[i]
        worker = slot.worker
        assert worker is not None
        t0 = time.monotonic()
        poll(lambda: worker.proc.poll() is not None or scrape(slot.metrics_port), timeout, 0.1,
             f"{slot.name} /metrics")
        return time.monotonic() - t0

    def stop_all(self) -> None:
        """Teardown: every worker stopped (SIGTERM, then SIGKILL after 10 s), recorded as caused."""
        self.stopping.set()
        for slot in self.slots:
            with slot.lock:
                if slot.worker is not None and slot.worker.proc.poll() is None:
                    slot.expected_exit = True
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(slot.worker.proc.pid, signal.SIGCONT)  # a stopped worker cannot handle SIGTERM
                    code = slot.worker.stop(signal.SIGTERM, timeout=10)
                    self._record(slot, code, caused=True, why="teardown")
        if self.supervisor.is_alive():
            self.supervisor.join(5)

    # -- faults ----------------------------------------------------------------
    def kill(self, i: int) -> dict[str, Any]:
        slot = self.slots[i]
        with slot.lock:
            assert slot.worker is not None
            slot.expected_exit = True
            pid = slot.worker.proc.pid
            code = slot.worker.stop(signal.SIGKILL, timeout=10)
            self._record(slot, code, caused=True, why="fault: worker_kill")
        return {"worker": slot.name, "pid": pid}

    def restart(self, i: int) -> dict[str, Any]:
        worker = self.start(i)
        return {"worker": self.slots[i].name, "pid": worker.proc.pid, "ready_after_s": round(self.wait_ready(i), 2)}

    def signal_group(self, i: int, sig: int) -> dict[str, Any]:
        """SIGSTOP or SIGCONT the worker's process group."""
        slot = self.slots[i]
        with slot.lock:
            worker = slot.worker
            if worker is None or worker.proc.poll() is not None:
                return {"worker": slot.name, "skipped": "not running"}
            os.killpg(worker.proc.pid, sig)
            return {"worker": slot.name, "pid": worker.proc.pid}

    def live_metrics_port(self) -> int | None:
        for slot in self.slots:
            if slot.worker is not None and slot.worker.proc.poll() is None and scrape(slot.metrics_port):
                return slot.metrics_port
        return None

    # -- the supervisor ------------------------------------------------------------
    def _supervise(self) -> None:
        while not self.stopping.wait(0.1):
            for i, slot in enumerate(self.slots):
                with slot.lock:
                    worker = slot.worker
                    if worker is None or slot.expected_exit or worker.proc.poll() is None:
                        continue
                    code = worker.proc.returncode
                    worker.log.close()
                    self._record(slot, code, caused=False, why="exited on its own")
                    slot.worker = None
                if self.stopping.wait(RESTART_DELAY_S):
                    return
                with slot.lock:
                    if slot.worker is None and not self.stopping.is_set():
                        self.start(i)

    def _record(self, slot: Slot, code: int | None, caused: bool, why: str) -> None:
        worker = slot.worker
        assert worker is not None
        record = {"worker": slot.name, "incarnation": slot.incarnation, "pid": worker.proc.pid, "t": time.time(),
                  "code": code, "caused": caused, "why": why, "log": worker.log_path.name}
        with open(self.exits_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.on_exit(record)
