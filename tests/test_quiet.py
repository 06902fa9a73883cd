"""Quiet under failure (issue 19): in the caller's thread every log line is throttled and no traceback is
logged per call, whatever fails: bad input, an unreachable Redis (calls held in the outbox), a bug."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import redis

from observer_tasks import observe, observe_late
from observer_tasks.client import producer
from observer_tasks.core.timings import RIDE_OUT_S

from .conftest import DATA_URL, free_port
from .timing import hold


def callers_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    me = threading.get_ident()
    return [rec for rec in caplog.records if rec.thread == me and rec.name.startswith("observer_tasks")]


def test_the_callers_thread_logs_each_problem_at_most_once_per_period(
        r: redis.Redis, env: dict[str, str], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG, "observer_tasks")
    assert observe("warm-up", "BTCUSDT") == "missing"
    caplog.clear()

    # Bad input, 1000 calls: one line, no traceback.
    assert {call("bad:id", "BTCUSDT") for _ in range(500) for call in (observe, observe_late)} == {"error"}
    lines = callers_lines(caplog)
    assert len(lines) == 1 and not lines[0].exc_info, [rec.getMessage() for rec in lines]
    caplog.clear()

    # Redis unreachable past the ride-out: every call held in the outbox (round-4 migration change 3: no 2 s
    # give-up and no breaker refusing calls any more, so "deferred" throughout, never "error").
    env["REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    results = []
    deadline = time.monotonic() + RIDE_OUT_S + 1.5
    while time.monotonic() < deadline:
        results += [observe(f"u{len(results)}", "BTCUSDT"), observe_late(f"v{len(results)}", "BTCUSDT")]
        hold(0.002, "pacing: about 500 calls/s")
    assert set(results) == {"deferred"} and len(results) > 1000
    lines = callers_lines(caplog)
    print(f"\n{len(results)} calls against an unreachable Redis: caller's thread logged "
          f"{[rec.getMessage()[:90] for rec in lines]}")
    # Two start-up lines (a new Producer for the new URL) and at most one "handed over" line; the outbox
    # thread's lines come from the background thread.
    assert len(lines) <= 3 and not any(rec.exc_info for rec in lines)
    caplog.clear()

    # A bug reaching the caller's path: one traceback per LOG_EVERY_S, not one per call.
    env["REDIS_URL"] = DATA_URL
    assert observe("warm-again", "BTCUSDT") == "missing"
    p = producer.producer()
    assert p is not None

    def bug(*_args: object, **_kwargs: object) -> str:
        raise RuntimeError("a bug in the observer")

    monkeypatch.setattr(p, "observe", bug)
    caplog.clear()
    assert {observe(f"b{i}", "BTCUSDT") for i in range(500)} == {"error"}
    lines = callers_lines(caplog)
    assert len(lines) == 1 and lines[0].exc_info and "a bug in the observer" in caplog.text
