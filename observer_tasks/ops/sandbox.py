"""Where the demo runs: a private redis-server (or a Redis given on the command line), a worker started
for it when none consumes late_obs, both stopped at the end.

A sourced production env file must never send fake plans to the real streams: without --redis-url the demo
points REDIS_URL and CELERY_BROKER_URL at a redis-server of its own, whatever the environment says.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click

from ..core.connections import redis_client
from ..core.messages import QUEUE
from ..core.settings import Settings
from .broker import late_obs_workers, use_broker
from .probes import REDIS_ERRORS

#: How long to wait for a started worker or redis-server to answer (s).
START_TIMEOUT_S = 30.0


class Child:
    """A process started by the demo, its output in a temporary file, stopped at the end."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"observer-demo-{name}-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)

    def wait_for(self, ready: Any, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                state = f"exited with code {self.proc.returncode}" if self.proc.returncode else "did not answer"
                raise click.ClickException(f"{self.name} {state} ({what}); last output: {self.tail()!r}")
            time.sleep(0.1)

    def tail(self) -> str:
        lines = Path(self.log.name).read_text(errors="replace").strip().splitlines()
        return lines[-1][-200:] if lines else ""

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(url: str) -> bool:
    try:
        return bool(redis_client(url, 0.5, "demo").ping())
    except REDIS_ERRORS:
        return False


def private_redis(stack: ExitStack, say: Any) -> None:
    """Start a throw-away redis-server and point REDIS_URL and CELERY_BROKER_URL at it, whatever the environment
    says (an operator's sourced env file must never send fake plans to the real streams)."""
    exe = shutil.which("redis-server")
    if not exe:
        raise click.ClickException("the demo runs on a private redis-server and there is none on PATH: install one "
                                   "(apt-get install redis-server), or give a Redis of its own with --redis-url")
    port = free_port()
    server = Child("redis-server", [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no"])
    stack.callback(server.stop)
    point_at(f"redis://127.0.0.1:{port}/0", f"redis://127.0.0.1:{port}/1")
    server.wait_for(lambda: answers(os.environ["REDIS_URL"]), f"port {port}")
    say(f"started a private redis-server on port {port} (stopped at the end)")


def ensure_worker(stack: ExitStack, settings: Settings, run_id: str, no_worker: bool, say: Any) -> bool:
    """True when a worker consumes late_obs: one already running, or one started here."""
    running = late_obs_workers(settings)
    if running:
        say(f"using the running worker(s): {', '.join(running)}")
        return True
    if no_worker:
        say(f"no worker consumes {QUEUE} (--no-worker): publish_plan_post will not be observed")
        return False
    name = f"demo-{run_id}@localhost"
    env = {**os.environ, "P28_METRICS_PORT": "0"}
    worker = Child("worker", [sys.executable, "-m", "celery", "-A", "observer_tasks", "worker", "-Q", QUEUE,
                              "-n", name, "--loglevel", "WARNING"], env)
    stack.callback(worker.stop)
    app = use_broker(settings)
    worker.wait_for(lambda: app.control.ping(destination=[name], timeout=0.5), "no reply to ping")
    say(f"started worker {name} (stopped at the end)")
    return True


def point_at(redis_url: str, broker_url: str) -> None:
    """The demo's Redis and broker for itself and the worker it starts: REDIS_URL and CELERY_BROKER_URL, and no
    P28_LATE_OBS_BROKER_URL (it would win over CELERY_BROKER_URL and send the demo's messages elsewhere)."""
    os.environ["REDIS_URL"], os.environ["CELERY_BROKER_URL"] = redis_url, broker_url
    os.environ.pop("P28_LATE_OBS_BROKER_URL", None)
