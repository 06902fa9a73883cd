"""Each plan's task events against a real worker, read the way Flower and celery-exporter read them.

Flower feeds every task event into a ``celery.events.state.State``; celery-exporter (danihodovic, src/exporter.py)
only the types it counts (task-sent, -received, -started, -succeeded, -failed, -rejected, -revoked, -retried),
labelled with the task's name and queue from its State (``name="None", queue_name="celery"`` without them): our
``task-timeout``, ``task-missing`` ... are neither counted nor in its State. Required for every plan, whichever path
decided it (look, wake step, sweeper, admission) and across a broker outage: one final event (task-succeeded for a
hit, ``task-<reason>`` otherwise) with the outcome, runtime, name and queue; at most one RETRY; no FAILURE; the
final state (SUCCESS, TIMEOUT, MISSING ...) in Flower's State; each task-sent with the publish time as ``received``.
"""

from __future__ import annotations

import ast
import contextlib
import socket
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
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

from .conftest import DATA_URL, HEAT, PrivateRedis, Worker, assert_exactly_once, late_entries, poll
from .proxy import Proxy

#: The event types celery-exporter has a handler (and a counter) for; it never sees any other.
EXPORTER_TYPES = ("task-sent", "task-received", "task-started", "task-succeeded", "task-failed", "task-rejected",
                  "task-revoked", "task-retried")
FINAL_TYPES = {"task-succeeded", *(f"task-{reason}" for reason in C.REASONS if reason != "ok")}
#: The fields of Celery's own task-sent (celery/app/amqp.py), to which the sender adds ``received``.
CELERY_SENT_FIELDS = {"uuid", "root_id", "parent_id", "name", "args", "kwargs", "retries", "eta", "expires", "queue",
                      "exchange", "routing_key"}


@contextlib.contextmanager
def receiving(url: str) -> Iterator[list[dict[str, Any]]]:
    """Every event on the broker at ``url`` from now on (a Celery event receiver, consuming before this returns)."""
    from observer_tasks.core.app import app

    events: list[dict[str, Any]] = []
    seen_probe = threading.Event()

    def on_event(event: dict[str, Any]) -> None:
        events.append(event)
        if event.get("type") == "worker-probe":
            seen_probe.set()

    with app.connection_for_read(url) as conn:
        receiver = app.events.Receiver(conn, handlers={"*": on_event})
        (thread := threading.Thread(target=receiver.capture, kwargs={"limit": None, "wakeup": False},
                                    daemon=True)).start()
        with app.connection_for_write(url) as out:
            dispatcher = app.events.Dispatcher(out)
            poll(lambda: (dispatcher.send("worker-probe"), seen_probe.wait(0.2))[1], timeout=10,
                 what="the event receiver consuming")
        yield events
        receiver.should_stop = True
        thread.join(5)


@pytest.fixture
def task_events(env: dict[str, str]) -> Iterator[list[dict[str, Any]]]:
    with receiving(env["CELERY_BROKER_URL"]) as events:
        yield events


def of_plans(events: list[dict[str, Any]], ids: dict[str, str]) -> list[dict[str, Any]]:
    return [e for e in list(events) if e["type"].startswith("task-") and e.get("uuid") in ids]


def finals(events: list[dict[str, Any]], ids: dict[str, str]) -> Counter[str]:
    return Counter(ids[e["uuid"]] for e in of_plans(events, ids) if e["type"] in FINAL_TYPES)


def assert_one_final_state_each(events: list[dict[str, Any]], ids: dict[str, str],
                                entries: dict[str, dict[str, str]]) -> State:
    """Every plan: one final event of its reason's type, carrying the outcome, name and queue; Flower's State in the
    final state. Returns that State."""
    mine = of_plans(events, ids)
    flower, counts = State(), Counter[tuple[str, str]]()
    for event in mine:
        flower.event(dict(event))
        counts[(ids[event["uuid"]], event["type"])] += 1
    for task_id, plan in ids.items():
        entry, task = entries[plan], flower.tasks[task_id]
        reason = entry["heat_reason"]
        final_type, final_state = ("task-succeeded", "SUCCESS") if reason == "ok" else (f"task-{reason}",
                                                                                       reason.upper())
        assert {t: n for (p, t), n in counts.items() if p == plan and t in FINAL_TYPES} == {final_type: 1}, plan
        assert counts[(plan, "task-failed")] == 0 and counts[(plan, "task-retried")] <= 1, plan
        assert counts[(plan, "task-sent")] <= 1, plan
        assert task.state == final_state and task.runtime == int(entry["wait_ms"]) / 1000, (plan, task.state)
        assert ast.literal_eval(task.result) == {"reason": reason, "wait_ms": int(entry["wait_ms"]),
                                                 "recorded_by": entry["recorded_by"]}, plan
        assert task.exception is None, plan  # the first look's "Waiting(...)" cleared by the final event
        # The final event alone names the task: a State that lost (or never had) its task-sent still does.
        alone = State()
        alone.event(dict(next(e for e in mine if e["uuid"] == task_id and e["type"] == final_type)))
        assert (alone.tasks[task_id].name, alone.tasks[task_id].queue) == (LATE_OBSERVE, QUEUE), plan
    return flower


def exporter_counts(events: list[dict[str, Any]], ids: dict[str, str]) -> Counter[tuple[str, str, str]]:
    """celery-exporter's counters for these plans: (event type, name label, queue_name label) -> count."""
    state, counts = State(), Counter[tuple[str, str, str]]()
    for event in (e for e in of_plans(events, ids) if e["type"] in EXPORTER_TYPES):
        state.event(dict(event))
        task = state.tasks[event["uuid"]]
        counts[(event["type"], str(task.name), getattr(task, "queue", "celery"))] += 1
    return counts


def test_every_plan_ends_with_one_final_state(r: redis.Redis, env: dict[str, str],
                                              start_worker: Callable[..., Worker],
                                              task_events: list[dict[str, Any]]) -> None:
    # A first look 300 ms after the call (the default, MAX_WAIT_MS, would make it the only look: no RETRY).
    env.update(P28_LATE_OBS_MAX_WAIT_MS="2000", P28_LATE_OBS_SAFETY_POLL_MS="300")
    worker = start_worker()
    tag = uuid.uuid4().hex[:6]
    woken, quiet, late = ([f"{k}{tag}{i}" for i in range(6)] for k in "wql")
    before = r.time()
    for plan in woken + quiet + late:
        assert observe_late(plan, "BTCUSDT", "EXECUTE") == "enqueued"
    for plan in woken:
        r.hset(HEAT + plan, mapping={"heat_level": "warm", "heat_action": "NONE"})
    # The late ones get their heat once their first look found them waiting: RETRY, then the wake step's SUCCESS.
    late_ids = {C.task_id(p): p for p in late}
    poll(lambda: {e["uuid"] for e in of_plans(task_events, late_ids) if e["type"] == "task-retried"} == set(late_ids),
         what="the late plans' RETRY")
    for plan in late:
        r.hset(HEAT + plan, mapping={"heat_level": "warm", "heat_action": "NONE"})
    # Heat written before the call: the admission records the plan at once, no message is sent, and the apply
    # process sends the plan's task-sent and final event itself.
    first = [f"a{tag}{i}" for i in range(2)]
    for plan in first:
        r.hset(HEAT + plan, mapping={"heat_level": "hot", "heat_action": "NONE"})
        assert observe_late(plan, "BTCUSDT", "EXECUTE") == "enqueued"
    after = r.time()
    # Plans whose first message never left (admitted, nothing sent): no task-sent at all. The sweeper decides
    # two of them (one noted as unsent: missing; one not: timeout); the wake step the third (its heat arrives).
    ledger = Ledger(Settings.from_env(env), redis_client(DATA_URL, 1.0, "test"))
    swept, unsent, woken_unsent = f"s{tag}", f"m{tag}", f"h{tag}"
    for plan in (swept, unsent, woken_unsent):
        assert ledger.admit(plan, "ETHUSDT", "SKIP").status == "admitted"
    ledger.note({unsent: "test: first message never sent"})
    r.hset(HEAT + woken_unsent, mapping={"heat_level": "hot", "heat_action": "NONE"})
    plans = woken + quiet + late + first + [swept, unsent, woken_unsent]
    poll(lambda: len(late_entries(r)) == len(plans), timeout=30, what="every plan recorded")
    entries = {e["plan_id"]: e for e in assert_exactly_once(r, plans)}
    ids = {C.task_id(p): p for p in plans}
    poll(lambda: set(finals(task_events, ids)) == set(plans), timeout=10, what="a final event for every plan")
    # Anything still in flight would arrive within the final-state delay: wait for the worker to be quiet.
    worker.stop()

    flower = assert_one_final_state_each(task_events, ids, entries)
    assert {entries[p]["recorded_by"] for p in woken + late + [woken_unsent]} == {"wake"}
    assert {(entries[p]["heat_reason"], entries[p]["recorded_by"]) for p in quiet} == {("timeout", "look")}
    retried = Counter(ids[e["uuid"]] for e in of_plans(task_events, ids) if e["type"] == "task-retried")
    assert set(retried) >= set(quiet + late) and set(retried.values()) == {1}  # none won over the final state
    assert {(entries[p]["heat_reason"], entries[p]["recorded_by"]) for p in first} == {("ok", "admit")}
    assert [(entries[p]["heat_reason"], entries[p]["recorded_by"], flower.tasks[C.task_id(p)].state)
            for p in (swept, unsent)] == [("timeout", "sweep", "TIMEOUT"), ("missing", "sweep", "MISSING")]
    assert {flower.tasks[C.task_id(p)].state for p in quiet} == {"TIMEOUT"}

    # task-sent: one per plan with a message or recorded at admission, Celery's fields plus the publish time.
    sent = {ids[e["uuid"]]: e for e in of_plans(task_events, ids) if e["type"] == "task-sent"}
    assert sorted(sent) == sorted(woken + quiet + late + first)
    for plan, event in sent.items():
        assert set(event) >= CELERY_SENT_FIELDS | {"received"}, plan
        assert (event["name"], event["queue"], event["routing_key"]) == (LATE_OBSERVE, QUEUE, QUEUE), plan
        assert before[0] + before[1] / 1e6 - 0.001 <= event["received"] <= after[0] + after[1] / 1e6, plan
        assert flower.tasks[C.task_id(plan)].received == event["received"], plan
    # The admission-recorded plans' task-sent (built by the sender) has the shape of Celery's (sent plans).
    assert {frozenset(sent[p]) for p in woken + quiet + late + first} == {frozenset(sent[first[0]])}

    # celery-exporter: a task-sent per plan with one, a task-succeeded per hit (named), nothing for the others.
    hits = [p for p in plans if entries[p]["heat_reason"] == "ok"]
    assert exporter_counts(task_events, ids) == Counter({("task-sent", LATE_OBSERVE, QUEUE): len(sent),
                                                         ("task-succeeded", LATE_OBSERVE, QUEUE): len(hits),
                                                         ("task-retried", LATE_OBSERVE, QUEUE): len(retried)})


class Link(Proxy):
    """tests/proxy.py's proxy in front of the broker, whose link can be cut (its connections shut down, new ones
    closed at once: the broker down as its clients see it, refused, never silent) and restored (``up``)."""

    def __init__(self, target_port: int) -> None:
        super().__init__(("127.0.0.1", target_port))
        self.up = threading.Event()
        self.up.set()
        self.refused = 0

    def pipe(self, client: socket.socket) -> None:
        if self.up.is_set():
            super().pipe(client)
        else:
            self.refused += 1
            client.close()

    def cut(self) -> None:
        self.up.clear()
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for sock in sockets:  # each pipe then reads the end of its connection and closes both sides
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@pytest.mark.slow
def test_final_states_survive_a_broker_outage(r: redis.Redis, env: dict[str, str], tmp_path: Path,
                                              start_worker: Callable[..., Worker]) -> None:
    broker = PrivateRedis(tmp_path).start()
    (link := Link(broker.port)).start()
    # The workers and the apply process reach the broker through the link; the test's receiver directly (it misses
    # nothing published while the link is cut).
    env.update(CELERY_BROKER_URL=f"redis://127.0.0.1:{link.port}/0", P28_LATE_OBS_MAX_WAIT_MS="1500")
    try:
        with receiving(broker.url) as events:
            worker = start_worker()
            tag = uuid.uuid4().hex[:6]
            woken, quiet = [f"w{tag}{i}" for i in range(6)], [f"q{tag}{i}" for i in range(6)]
            for plan in woken + quiet:
                assert observe_late(plan, "BTCUSDT", "EXECUTE") == "enqueued"
            early = {C.task_id(p): p for p in woken + quiet}
            poll(lambda: len({e["uuid"] for e in of_plans(events, early) if e["type"] == "task-sent"}) == 12,
                 what="the first messages sent")

            link.cut()  # the broker is down for everyone but the test's receiver
            for plan in woken:  # decided by the wake step while the broker is down
                r.hset(HEAT + plan, mapping={"heat_level": "warm", "heat_action": "NONE"})
            # Recorded at admission while the broker is down: their task-sent and final event wait in the apply
            # process. And one admitted then (its message cannot leave: the sweeper decides it).
            first = [f"a{tag}{i}" for i in range(3)]
            for plan in first:
                r.hset(HEAT + plan, mapping={"heat_level": "hot", "heat_action": "NONE"})
                assert observe_late(plan, "BTCUSDT", "EXECUTE") == "enqueued"
            assert observe_late(stranded := f"m{tag}", "BTCUSDT", "EXECUTE") == "enqueued"
            plans = woken + quiet + first + [stranded]
            ids = {C.task_id(p): p for p in plans}
            # The quiet plans reach their deadline (a look, or the sweeper) while the broker is still down.
            poll(lambda: len(late_entries(r)) == len(plans), timeout=30, what="every plan recorded, broker down")
            assert link.refused > 0  # the worker and the apply process did try the broker
            assert not finals(events, ids), "a final event left while the broker was down"

            link.up.set()  # restored
            poll(lambda: set(finals(events, ids)) == set(plans), timeout=30,
                 what="a final event for every plan once the broker is back")
            worker.stop()
            entries = {e["plan_id"]: e for e in assert_exactly_once(r, plans)}
            flower = assert_one_final_state_each(events, ids, entries)
            assert not {p for p in plans if flower.tasks[C.task_id(p)].state in ("PENDING", "RETRY")}
            assert {entries[p]["recorded_by"] for p in woken} == {"wake"}
            assert {(entries[p]["heat_reason"], entries[p]["recorded_by"]) for p in first} == {("ok", "admit")}
            sent = {ids[e["uuid"]] for e in of_plans(events, ids) if e["type"] == "task-sent"}
            assert sent >= set(woken + quiet + first)  # the admission-recorded plans' task-sent was kept too
            log = worker.log_path.read_text()
            assert "task events for Flower not sent" in log and "task events for Flower sent again" in log
    finally:
        link.stop()
        broker.stop()
