"""The `celery -A observer_tasks worker -Q late_obs` command itself: start-up lines, refusals, switches."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from observer_tasks import observe_late

from .conftest import CELERY, ROOT, Worker

STARTUP = [
    "P2.8A Heat Observer: True",
    "P2.8A.3 Late Observer: True (wait=600ms, poll=50ms, workers=4, max_inflight=200)",
    "P2.8A.3: Late observer pool created (max_workers=4)",
    "P2.8A.3: wake path on (safety_poll=600ms)",  # 1000 ms clamped to MAX_WAIT_MS
]


def test_startup_lines_at_the_default_log_level(worker: Worker) -> None:
    out = worker.output()
    positions = [out.index(line) for line in STARTUP]
    assert positions == sorted(positions)
    assert "concurrency: 4 (thread)" in out
    # The operators' grep (runbook) finds exactly these four lines, nothing else of the start-up.
    grepped = subprocess.run(["grep", "-E", "P2.8A|Late Observer"], input=out, capture_output=True, text=True).stdout
    assert [line.split("] ", 1)[1] for line in grepped.splitlines()] == STARTUP


def test_importing_the_api_loads_nothing_of_the_worker() -> None:
    """A fresh interpreter, as the apply layer: no signal receiver of ours, kombu untouched, no services."""
    code = """
import sys
import kombu.transport.redis as kr
from celery import signals
before = kr.Channel._connparams
import observer_tasks
from observer_tasks import observe, observe_late
assert kr.Channel._connparams is before, "kombu patched"
ours = [name for name in dir(signals) if isinstance(getattr(signals, name), signals.Signal)
        for r in getattr(signals, name).receivers
        if "observer_tasks" in repr(r)]
assert not ours, ours
loaded = sorted(m for m in sys.modules if m.startswith("observer_tasks"))
not_ours = [m for m in loaded if m.startswith(("observer_tasks.worker", "observer_tasks.ops"))]
assert not not_ours, not_ours
print("clean", loaded)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "clean" in proc.stdout, proc.stderr


def test_the_worker_loads_its_services_and_the_guarded_transport(worker: Worker) -> None:
    out = worker.output()
    assert "observer_tasks.worker.kombu_guard:Transport" in out  # the banner's transport line (Redis broker)
    assert "observer_tasks: wake listener connected" in out


def test_concurrency_follows_max_workers(env: dict[str, str], start_worker) -> None:  # type: ignore[no-untyped-def]
    env["P28_LATE_OBS_MAX_WORKERS"] = "3"
    out = start_worker().output()
    assert "workers=3" in out and "(max_workers=3)" in out and "concurrency: 3 (thread)" in out


def test_disabled_switch_is_logged(env: dict[str, str], start_worker) -> None:  # type: ignore[no-untyped-def]
    env["P28_LATE_OBS_ENABLED"] = "false"
    out = start_worker().output()
    assert "P2.8A.3 Late Observer: False\n" in out
    assert observe_late("p1", "BTCUSDT") == "disabled"


@pytest.mark.parametrize(("name", "value"), [
    ("P28_LATE_OBS_POLL_MS", "abc"),
    ("P28_LATE_OBS_MAX_WAIT_MS", "-1"),
    ("P28_LATE_OBS_ENABLED", "perhaps"),
    ("P28_LATE_OBS_MAX_INFLIGHT", "0"),
    ("P28_DEDUPE_TTL_SEC", ""),
    ("REDIS_URL", "http://nowhere"),
    ("REDIS_URL", "unix:///run/redis/redis.sock"),
    ("P28_LATE_OBS_SAFETY_POLL_MS", "10"),
    ("P28_LATE_OBS_WAKE", "maybe"),
])
def test_bad_settings_stop_the_worker_with_one_line(env: dict[str, str], name: str, value: str) -> None:
    proc = subprocess.run([CELERY, "-A", "observer_tasks", "worker", "-Q", "late_obs"], cwd=ROOT,
                          env={**os.environ, **env, name: value}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2  # the systemd unit's RestartPreventExitStatus=2 relies on it
    lines = [line for line in (proc.stdout + proc.stderr).splitlines()
             if line.strip() and "SecurityWarning" not in line and "superuser" not in line]
    refusal = [line for line in lines if line.startswith("P2.8A.3: refusing to start:")]
    assert len(refusal) == 1, lines
    # A bad value is quoted; a valid number outside the range the other settings allow is named as such.
    said = f"{name}={value} is outside" if name == "P28_LATE_OBS_SAFETY_POLL_MS" else f"{name}={value!r}"
    assert said in refusal[0], refusal[0]
    assert "Traceback" not in proc.stdout + proc.stderr


def test_poll_above_wait_stops_the_worker(env: dict[str, str]) -> None:
    proc = subprocess.run([CELERY, "-A", "observer_tasks", "worker", "-Q", "late_obs"], cwd=ROOT,
                          env={**os.environ, **env, "P28_LATE_OBS_POLL_MS": "700"}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "P28_LATE_OBS_POLL_MS=700 is above P28_LATE_OBS_MAX_WAIT_MS=600" in proc.stderr


def test_warm_shutdown_exits_zero(worker: Worker) -> None:
    assert worker.stop() == 0
