"""late_obs as a RabbitMQ quorum queue (P28_LATE_OBS_QUEUE_TYPE=quorum): the core flow on a real worker and a
real apply process, countdowns through Celery's native delayed delivery, and `status` on it.

The apply layer runs in a child process: it must read the setting when it imports the observer, as in
production, since each side declares the queue and RabbitMQ refuses a declaration of another type. The test
removes the queues and exchanges it made on the test's vhost (TEST_AMQP_URL) before and after.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
import redis
from kombu import Connection

from .conftest import AMQP_URL, ROOT, Worker, inflight, late_entries, poll

HEAT = "quantum:harvest:heat:by_plan:"
QUORUM = {"P28_LATE_OBS_QUEUE_TYPE": "quorum", "P28_LATE_OBS_MAX_WAIT_MS": "3000", "P28_LATE_OBS_POLL_MS": "1000",
          "P28_LATE_OBS_SAFETY_POLL_MS": "1000"}
#: Celery's native delayed delivery: 28 levels of exchanges and queues (celery_delayed_0 .. celery_delayed_27).
DELAYED_LEVELS = 28


def remove_queues() -> None:
    with Connection(AMQP_URL, connect_timeout=5) as conn:
        for name in ["late_obs", *(f"celery_delayed_{i}" for i in range(DELAYED_LEVELS))]:
            with contextlib.suppress(Exception):
                conn.channel().queue_delete(name)
        for name in ["late_obs", "celery_delayed_delivery", *(f"celery_delayed_{i}" for i in range(DELAYED_LEVELS))]:
            with contextlib.suppress(Exception):
                conn.channel().exchange_delete(name)


@pytest.fixture
def quorum(env: dict[str, str]) -> Iterator[dict[str, str]]:
    remove_queues()  # a classic late_obs left by another test would refuse the quorum declaration
    env.update({"CELERY_BROKER_URL": AMQP_URL, **QUORUM})
    yield env
    remove_queues()


def delayed_messages() -> int:
    """Messages waiting in Celery's native delayed-delivery queues (their countdown not yet over)."""
    total = 0
    with Connection(AMQP_URL, connect_timeout=5) as conn:
        for i in range(DELAYED_LEVELS):
            with contextlib.suppress(Exception):
                total += int(conn.channel().queue_declare(f"celery_delayed_{i}", passive=True).message_count)
    return total


def apply_layer(env: dict[str, str], plans: list[str]) -> list[str]:
    """observe_late for each plan in a fresh apply process; its answers."""
    # It waits (10 s at most) for its publisher thread to have sent everything: on a loaded machine the first
    # connection to RabbitMQ can take longer than the exit flush, which would leave the plans to the sweeper.
    code = ("import json, sys, time\nfrom observer_tasks import observe_late\n"
            "from observer_tasks.client import producer\n"
            "out = [observe_late(p, 'BTCUSDT') for p in sys.argv[1:]]\n"
            "deadline = time.monotonic() + 10\n"
            "while producer._producer.publisher._pending() and time.monotonic() < deadline:\n"
            "    time.sleep(0.05)\n"
            "print(json.dumps(out))\n")
    done = subprocess.run([sys.executable, "-c", code, *plans], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


def test_quorum_late_obs_runs_the_core_flow(r: redis.Redis, quorum: dict[str, str],
                                            start_worker: Callable[..., Worker]) -> None:
    worker = start_worker()
    poll(lambda: r.exists("quantum:p28:late_obs:wake_ok"), what="wake path healthy")
    # The worker declared late_obs as a quorum queue: a classic declaration is refused.
    with Connection(AMQP_URL, connect_timeout=5) as conn, pytest.raises(Exception, match="x-queue-type"):
        conn.channel().queue_declare("late_obs", durable=True, auto_delete=False,
                                     arguments={"x-queue-type": "classic"})
    env = {**worker.env, "P28_METRICS_PORT": "0"}
    plans = [f"q{i}" for i in range(10)]
    assert apply_layer(env, plans) == ["enqueued"] * 10
    for plan in plans[::2]:
        r.hset(HEAT + plan, "heat_level", "hot")
    # Hits by the wake step; the others looked at every second (delayed delivery) and timed out at 3 s.
    poll(lambda: inflight(r) == 0 and len(late_entries(r)) == 10, timeout=20, what="every plan recorded")
    entries = late_entries(r)
    assert sorted(e["plan_id"] for e in entries) == sorted(plans)
    assert Counter((e["heat_reason"], e["recorded_by"]) for e in entries) == {("ok", "wake"): 5,
                                                                              ("timeout", "look"): 5}
    for e in entries:
        if e["heat_reason"] == "timeout":
            # Looks at 0 s then every second to the deadline: a countdown lost to a sub-second truncation
            # would have looked in a loop, and one that never arrived would leave the plan to the sweeper.
            assert 3 <= int(e["polls"]) <= 5, e
            assert json.loads(e["debug_json"]).get("late_ms", 0) < 1500, e
    status = subprocess.run([str(ROOT / ".venv/bin/observer-tasks"), "status"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert "late_obs queue length 0" in status.stdout and "workers:    1 consuming late_obs" in status.stdout
    assert "Traceback" not in worker.output()


@pytest.mark.parametrize(("extra", "why"), [
    ({"P28_LATE_OBS_POLL_MS": "100", "P28_LATE_OBS_SAFETY_POLL_MS": "1000"}, "P28_LATE_OBS_POLL_MS=100 with"),
    ({"P28_LATE_OBS_SAFETY_POLL_MS": "1500"}, "P28_LATE_OBS_SAFETY_POLL_MS=1500 with"),
    ({"CELERY_BROKER_URL": "redis://127.0.0.1:6379/14"}, "needs a RabbitMQ broker"),
])
def test_quorum_refuses_what_delayed_delivery_cannot_do(env: dict[str, str], extra: dict[str, str],
                                                        why: str) -> None:
    from observer_tasks.core.settings import Settings, SettingsError

    with pytest.raises(SettingsError, match=why):
        Settings.from_env({**env, "CELERY_BROKER_URL": AMQP_URL, **QUORUM, **extra})


@pytest.mark.slow
def test_quorum_worker_killed_mid_load(r: redis.Redis, quorum: dict[str, str],
                                       start_worker: Callable[..., Worker]) -> None:
    """SIGKILL with plans parked in RabbitMQ's delayed-delivery queues and in the worker's hands: a new worker
    takes the returned and the delayed messages and records every plan exactly once."""
    quorum["P28_LATE_OBS_MAX_WAIT_MS"] = "6000"
    first = start_worker()
    plans = [f"k{i}" for i in range(40)]
    assert apply_layer({**first.env, "P28_METRICS_PORT": "0"}, plans) == ["enqueued"] * 40
    poll(lambda: delayed_messages() >= 20, timeout=15, what="reschedules parked in the delayed-delivery queues")
    first.stop(9)
    assert inflight(r) > 0  # plans in flight at the kill (no heat, a 6 s window)
    start_worker()
    poll(lambda: inflight(r) == 0, timeout=60, interval=0.2, what="every lease recorded")
    entries = late_entries(r)
    assert sorted(e["plan_id"] for e in entries) == sorted(plans)
    counts = {k.decode(): int(v) for k, v in r.hgetall("quantum:p28:counters").items()}
    assert sum(counts.get(f"recorded|{p}", 0) for p in ("look", "wake", "sweep")) == 40
    print(f"\nquorum, worker SIGKILLed: {dict(Counter(e['recorded_by'] for e in entries))}")
