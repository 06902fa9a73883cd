"""late_obs as a RabbitMQ quorum queue (P28_LATE_OBS_QUEUE_TYPE=quorum): the core flow on a real worker and a
real apply process, countdowns through Celery's native delayed delivery, and `status` on it.

The apply layer runs in a child process: it must read the setting when it imports the observer, as in
production, since each side declares the queue and RabbitMQ refuses a declaration of another type. The test
removes the queues and exchanges it made on the test's vhost (TEST_AMQP_URL) before and after.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest
import redis
from kombu import Connection

from observer_tasks.core import contract as C
from observer_tasks.core.messages import LateMessage
from observer_tasks.core.settings import Settings, SettingsError
from observer_tasks.worker import tasks

from .conftest import AMQP_URL, HEAT, ROOT, Worker, assert_exactly_once, counters, inflight, late_entries, poll

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
    # It waits (10 s at most) for its outbox thread to have sent everything: on a loaded machine the first
    # connection to RabbitMQ can take longer than the exit flush, which would leave the plans to the sweeper.
    code = ("import json, sys, time\nfrom observer_tasks import observe_late\n"
            "from observer_tasks.client import producer\n"
            "out = [observe_late(p, 'BTCUSDT') for p in sys.argv[1:]]\n"
            "p = producer._producer\n"
            "deadline = time.monotonic() + 10\n"
            "while (p.outbox.calls or p.sender.queue) and time.monotonic() < deadline:\n"
            "    time.sleep(0.05)\n"
            "print(json.dumps(out))\n")
    done = subprocess.run([sys.executable, "-c", code, *plans], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("intervals", ["whole-seconds", "defaults"])
def test_quorum_late_obs_runs_the_core_flow(r: redis.Redis, quorum: dict[str, str],
                                            start_worker: Callable[..., Worker], intervals: str) -> None:
    if intervals == "defaults":  # POLL_MS=100 and the default safety interval: each countdown rounded up
        for name in ("P28_LATE_OBS_POLL_MS", "P28_LATE_OBS_SAFETY_POLL_MS"):
            del quorum[name]
            os.environ.pop(name, None)
    worker = start_worker()
    poll(lambda: r.exists(C.WAKE), what="wake path healthy")
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
            # Whole seconds: looks at 0 s then every second to the deadline (a countdown lost to a sub-second
            # truncation would have looked in a loop, one that never arrived would leave the plan to the sweeper).
            # Defaults: the safety interval is MAX_WAIT_MS, so the one look is at the deadline (delayed delivery).
            assert (3 <= int(e["polls"]) <= 5) if intervals == "whole-seconds" else e["polls"] == "1", e
            assert json.loads(e["debug_json"]).get("late_ms", 0) < 1500, e
    status = subprocess.run([str(ROOT / ".venv/bin/observer-tasks"), "status"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert "late_obs queue length 0" in status.stdout and "workers:    1 consuming late_obs" in status.stdout
    assert "Traceback" not in worker.output()


def test_quorum_refuses_a_redis_broker(env: dict[str, str]) -> None:
    with pytest.raises(SettingsError, match="needs a RabbitMQ broker"):
        Settings.from_env({**env, **QUORUM, "CELERY_BROKER_URL": "redis://127.0.0.1:6379/14"})


@pytest.mark.parametrize("extra", [
    {},  # the defaults: POLL_MS=100, the safety interval MAX_WAIT_MS
    {"P28_LATE_OBS_POLL_MS": "100", "P28_LATE_OBS_SAFETY_POLL_MS": "1000"},
    {"P28_LATE_OBS_SAFETY_POLL_MS": "1500"},
])
def test_quorum_takes_sub_second_and_fractional_intervals(env: dict[str, str], extra: dict[str, str]) -> None:
    """Delayed delivery counts whole seconds, so a quorum late_obs used to refuse intervals it could not keep;
    now it starts with the defaults and rounds each countdown up (test_quorum_countdowns_round_up)."""
    base = {k: v for k, v in env.items() if not k.startswith("P28_LATE_OBS_")}
    settings = Settings.from_env({**base, "CELERY_BROKER_URL": AMQP_URL, "P28_LATE_OBS_QUEUE_TYPE": "quorum",
                                  **extra})
    assert settings.late_obs_queue_type == "quorum"


@pytest.mark.parametrize(("queue_type", "countdown_ms", "sent_s"), [
    ("quorum", 100, 1), ("quorum", 1000, 1), ("quorum", 1001, 2), ("quorum", 0, 0),
    ("classic", 100, 0.1), ("classic", 1500, 1.5),
])
def test_quorum_countdowns_round_up(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, queue_type: str,
                                    countdown_ms: int, sent_s: float) -> None:
    """On a quorum late_obs the next look's countdown is rounded up to whole seconds (never early), so a
    sub-second POLL_MS looks once a second there; on a classic queue it is sent as it is."""
    settings = Settings.from_env({**env, "CELERY_BROKER_URL": AMQP_URL, "P28_LATE_OBS_QUEUE_TYPE": queue_type})
    sent: list[dict[str, object]] = []
    monkeypatch.setattr(tasks.late_poll, "apply_async", lambda **kw: sent.append(kw))
    task = SimpleNamespace(request=SimpleNamespace(id=C.task_id("p1")))
    again = tasks.Again(countdown_ms, "test", LateMessage("p1", "BTCUSDT", "", 1, 2, polls=1))
    assert tasks.reschedule(task, SimpleNamespace(settings=settings), again)  # type: ignore[arg-type]
    (message,) = sent
    assert message["countdown"] == sent_s and message["task_id"] == C.task_id("p1")


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
    entries = assert_exactly_once(r, plans)
    counts = counters(r)
    assert sum(counts("p28_late_obs_recorded", path) for path in C.RECORD_PATHS) == 40
    print(f"\nquorum, worker SIGKILLed: {dict(Counter(e['recorded_by'] for e in entries))}")
