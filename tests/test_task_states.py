"""Each plan's task events against a real worker, counted the way celery-exporter counts them.

celery-exporter (danihodovic/celery-exporter, src/exporter.py ``track_task_event``) feeds every task event
into a ``celery.events.state.State`` and increments one counter per event type (task-sent, task-received,
task-started, task-succeeded, task-failed, task-retried, ...), labelled with the task's name, hostname and
queue from that State; on task-succeeded it also observes the task's ``runtime`` (so the event must carry
one). This test does the same with Celery's own State and requires, for every plan, whichever path decided
it (the wake step, a look at the deadline, the sweeper, the admission itself): exactly one task-succeeded with
the plan's outcome, at most one task-retried before it, no task-failed, and SUCCESS as the State's final state.
"""

from __future__ import annotations

import ast
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery.events.state import State

from observer_tasks import observe_late
from observer_tasks.core import contract as C
from observer_tasks.core.connections import redis_client
from observer_tasks.core.ledger import Ledger
from observer_tasks.core.messages import LATE_OBSERVE, QUEUE
from observer_tasks.core.settings import Settings

from .conftest import DATA_URL, HEAT, Worker, inflight, late_entries, poll


@pytest.fixture
def task_events(env: dict[str, str]) -> Iterator[list[dict[str, Any]]]:
    """Every task event on the test broker, from before the test's first plan (a Celery event receiver)."""
    from observer_tasks.core.app import app

    events: list[dict[str, Any]] = []
    seen_probe = threading.Event()

    def on_event(event: dict[str, Any]) -> None:
        if event.get("type") == "worker-probe":
            seen_probe.set()
        events.append(event)

    with app.connection_for_read(env["CELERY_BROKER_URL"]) as conn:
        receiver = app.events.Receiver(conn, handlers={"*": on_event})
        thread = threading.Thread(target=receiver.capture, kwargs={"limit": None, "wakeup": False}, daemon=True)
        thread.start()
        with app.connection_for_write(env["CELERY_BROKER_URL"]) as out:
            dispatcher = app.events.Dispatcher(out)

            def probe() -> bool:
                dispatcher.send("worker-probe")
                return seen_probe.wait(0.2)

            poll(probe, timeout=10, what="the event receiver consuming")
        yield events
        receiver.should_stop = True
        thread.join(5)


def test_every_plan_ends_with_one_final_state(r: redis.Redis, env: dict[str, str], worker: Worker,
                                              task_events: list[dict[str, Any]]) -> None:
    tag = uuid.uuid4().hex[:6]
    woken = [f"w{tag}{i}" for i in range(8)]
    quiet = [f"q{tag}{i}" for i in range(8)]
    for plan in woken + quiet:
        assert observe_late(plan, "BTCUSDT", "EXECUTE") == "enqueued"
    for plan in woken:
        r.hset(HEAT + plan, mapping={"heat_level": "warm", "heat_action": "NONE"})
    # Heat written before the call: the admission records the plan at once, no message is sent, and the apply
    # process sends the plan's task-sent and task-succeeded itself.
    first = [f"a{tag}{i}" for i in range(2)]
    for plan in first:
        r.hset(HEAT + plan, mapping={"heat_level": "hot", "heat_action": "NONE"})
        assert observe_late(plan, "BTCUSDT", "EXECUTE") == "enqueued"
    # A plan whose first message never left (admitted, nothing sent): only the sweeper can decide it.
    ledger = Ledger(Settings.from_env(env), redis_client(DATA_URL, 1.0, "test"))
    swept = f"s{tag}"
    assert ledger.admit(swept, "ETHUSDT", "SKIP").status == "admitted"
    plans = woken + quiet + first + [swept]
    poll(lambda: inflight(r) == 0, timeout=30, what="every plan recorded")
    entries = {e["plan_id"]: e for e in late_entries(r)}
    assert sorted(entries) == sorted(plans)
    ids = {C.task_id(p): p for p in plans}

    def succeeded() -> Counter[str]:
        return Counter(e["uuid"] for e in list(task_events) if e["type"] == "task-succeeded" and e["uuid"] in ids)

    poll(lambda: set(succeeded()) == set(ids), timeout=10, what="a task-succeeded for every plan")
    # Anything still in flight would arrive within the final-state delay: wait for the worker to be quiet.
    worker.stop()

    state, counts = State(), Counter[tuple[str, str]]()
    for event in task_events:
        if event["type"].startswith("task-") and event.get("uuid") in ids:
            state.event(event)
            counts[(ids[event["uuid"]], event["type"])] += 1  # the exporter's counter, per plan
    for task_id, plan in ids.items():
        entry, task = entries[plan], state.tasks[task_id]
        assert counts[(plan, "task-succeeded")] == 1, plan
        assert counts[(plan, "task-failed")] == 0 and counts[(plan, "task-retried")] <= 1, plan
        assert task.state == "SUCCESS" and task.runtime is not None, plan
        assert ast.literal_eval(task.result) == {"reason": entry["heat_reason"], "wait_ms": int(entry["wait_ms"]),
                                                 "recorded_by": entry["recorded_by"]}, plan
        # Sent by observe_late, so the exporter labels it with the task's name and queue.
        assert plan == swept or (task.name, getattr(task, "queue", None)) == (LATE_OBSERVE, QUEUE)
    assert {entries[p]["recorded_by"] for p in woken} == {"wake"}
    assert {(entries[p]["heat_reason"], entries[p]["recorded_by"]) for p in quiet} == {("timeout", "look")}
    assert {(entries[p]["heat_reason"], entries[p]["recorded_by"]) for p in first} == {("ok", "admit")}
    assert entries[swept]["recorded_by"] == "sweep"
