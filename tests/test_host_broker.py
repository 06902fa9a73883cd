"""The observer's own broker setting: an apply layer with its own Celery app and broker keeps both (real processes).

Celery gives the CELERY_BROKER_URL variable to every Celery app of a process, so an apply layer whose own app
takes its broker from that variable would lose it to the observer (or give its broker to the observer). With
P28_LATE_OBS_BROKER_URL the observer has its own: the host's ``@shared_task`` goes to the host's broker, the
plan's first message to the observer's, and a worker on the observer's broker records the plan. Both ways
round: the host on Redis and the observer on RabbitMQ, and the reverse.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from kombu import Connection

from .conftest import AMQP_URL, BROKER_URL, Worker, late_entries, poll

HOST = """
import json
from celery import Celery, shared_task

host = Celery("host")  # its broker: CELERY_BROKER_URL, as Celery gives it to every app of the process

@shared_task(name="host.settle")
def settle(x):
    return x

import observer_tasks
from observer_tasks import observe_late

settle.apply_async(args=(1,), queue="host_q")  # the host's own task, on the host's own broker
result = observe_late("host-1", "BTCUSDT", "EXECUTE")
observer_tasks.client.producer.reset()  # flush the first message before the process exits
print(json.dumps({"result": result, "host_broker": host.connection_for_write().as_uri(),
                  "observer_broker": observer_tasks.app.connection_for_write().as_uri()}))
"""


def queued(url: str, queue: str) -> int:
    """Messages waiting in ``queue`` on the broker at ``url`` (declared passively: 0 when it does not exist)."""
    with Connection(url, connect_timeout=5) as conn:
        channel = conn.channel()
        try:
            return int(channel.queue_declare(queue, passive=True).message_count)
        except Exception:
            return 0


@pytest.mark.parametrize("host", ["redis", "amqp"])
def test_the_host_keeps_its_broker_and_the_observer_uses_its_own(
        host: str, r: redis.Redis, env: dict[str, str], start_worker: Callable[..., Worker],
        tmp_path: Path) -> None:
    host_url, observer_url = (BROKER_URL, AMQP_URL) if host == "redis" else (AMQP_URL, BROKER_URL)
    with Connection(AMQP_URL, connect_timeout=5) as conn:  # a clean start on the RabbitMQ side
        for queue in ("host_q", "late_obs"):
            with contextlib.suppress(Exception):  # not declared yet
                conn.channel().queue_purge(queue)
    env.update(CELERY_BROKER_URL=host_url, P28_LATE_OBS_BROKER_URL=observer_url)
    start_worker()  # the worker host sets both: P28_LATE_OBS_BROKER_URL wins
    proc = subprocess.run([sys.executable, "-c", HOST], cwd=tmp_path, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["result"] == "enqueued"
    assert out["host_broker"].split("://")[0] == host_url.split("://")[0]
    assert out["observer_broker"].split("://")[0] == observer_url.split("://")[0]
    # The host's task waits on the host's broker (no worker of the host runs here), and only there.
    poll(lambda: queued(host_url, "host_q") == 1, 10, what="the host's task on the host's broker")
    assert queued(observer_url, "host_q") == 0
    # No heat: only the look its first message starts, taken from the observer's broker, decides it.
    entries = poll(lambda: late_entries(r), 20, what="the plan recorded by the worker on the observer's broker")
    assert [(e["plan_id"], e["heat_reason"], e["recorded_by"]) for e in entries] == [("host-1", "timeout", "look")]
