"""A real Flower against the test broker sees the worker online and the late_obs tasks."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from observer_tasks import observe_late

from .conftest import CELERY, ROOT, Worker, free_port, inflight, poll

AUTH = "ops:s3cret"


def get(url: str, auth: str | None = AUTH) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return 0, ""


@pytest.fixture
def flower(r: redis.Redis, env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    port = free_port()
    log = open(tmp_path / "flower.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([CELERY, "-A", "observer_tasks", "flower", f"--port={port}", "--address=127.0.0.1",
                             f"--basic-auth={AUTH}"], cwd=ROOT, env={**os.environ, **env}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    poll(lambda: proc.poll() is not None or get(base + "/healthcheck")[0] == 200, timeout=30, interval=0.1,
         what="flower up")
    assert proc.poll() is None, (tmp_path / "flower.log").read_text()
    yield base
    proc.terminate()
    proc.wait(10)
    log.close()


def test_flower_sees_the_worker_and_the_late_tasks(r: redis.Redis, flower: str,
                                                   start_worker: Callable[..., Worker]) -> None:
    worker = start_worker()
    assert get(flower + "/api/workers", auth=None)[0] == 401  # authentication is required
    r.hset("quantum:harvest:heat:by_plan:f1", "heat_level", "hot")
    for plan in ("f1", "f2", "f3"):
        assert observe_late(plan, "BTCUSDT", "EXECUTE") == "enqueued"
    poll(lambda: inflight(r) == 0, timeout=30, what="plans recorded")

    def tasks() -> dict[str, dict[str, object]]:
        status, body = get(flower + "/api/tasks?taskname=observer_tasks.late_observe")
        return json.loads(body) if status == 200 else {}

    seen = poll(lambda: (t := tasks()) and {"p28-late-f1", "p28-late-f2", "p28-late-f3"} <= set(t) and t,
                what="the three plans' tasks in Flower")
    assert {seen[f"p28-late-{p}"]["state"] for p in ("f1", "f2", "f3")} == {"SUCCESS"}

    def online() -> bool:
        status, body = get(flower + "/metrics", auth=None)  # Prometheus scrapes /metrics without auth
        return status == 200 and any(
            line.startswith("flower_worker_online{") and line.endswith(" 1.0") and worker.hostname_prefix in line
            for line in body.splitlines())

    poll(online, what="flower_worker_online for the worker")
    _status, metrics = get(flower + "/metrics", auth=None)
    assert 'flower_events_total{task="observer_tasks.late_observe",type="task-succeeded"' in metrics
