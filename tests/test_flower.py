"""A real Flower against the test broker sees the worker online and the late_obs tasks, and each plan's life:
waiting while it waits, then its outcome: SUCCESS for a hit, a state of its own for any other outcome (TIMEOUT ...);
and its task list shows the newest plans first (its Received column holds each plan's publish time). Checked over
Flower's API and, as an operator sees it, in a headless Chromium: screenshots and the pages' text."""

from __future__ import annotations

import ast
import base64
import html
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from observer_tasks import observe_late
from observer_tasks.core import contract as C
from observer_tasks.core.messages import LATE_OBSERVE

from .conftest import CELERY, HEAT, ROOT, Worker, free_port, inflight, late_entries, lease, poll

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
    # f1's heat is written before the call: its admission records it (no message; the apply process sends its
    # task's events); f2's while it waits (the wake step, or a look); f3 gets none (a timeout at its deadline).
    r.hset(HEAT + "f1", "heat_level", "hot")
    for plan in ("f1", "f2", "f3"):
        assert observe_late(plan, "BTCUSDT", "EXECUTE") == "enqueued"
    r.hset(HEAT + "f2", "heat_level", "hot")
    poll(lambda: inflight(r) == 0, timeout=30, what="plans recorded")
    assert {e["plan_id"]: e["recorded_by"] for e in late_entries(r)}["f1"] == "admit"

    def tasks() -> dict[str, dict[str, object]]:
        status, body = get(flower + f"/api/tasks?taskname={LATE_OBSERVE}")
        return json.loads(body) if status == 200 else {}

    # Each plan's final state comes from whoever recorded it, just after the record (1 s later from the wake
    # step): SUCCESS for the hits, TIMEOUT (a custom state: its own badge, its own filter) for the timeout.
    def states() -> dict[str, object]:
        t = tasks()
        return {p: t.get(C.task_id(p), {}).get("state") for p in ("f1", "f2", "f3")}

    poll(lambda: states() == {"f1": "SUCCESS", "f2": "SUCCESS", "f3": "TIMEOUT"},
         what="the three plans' tasks in Flower, decided")
    assert list(json.loads(get(flower + "/api/tasks?state=TIMEOUT")[1])) == [C.task_id("f3")]

    def online() -> bool:
        status, body = get(flower + "/metrics", auth=None)  # Prometheus scrapes /metrics without auth
        return status == 200 and any(
            line.startswith("flower_worker_online{") and line.endswith(" 1.0") and worker.hostname_prefix in line
            for line in body.splitlines())

    poll(online, what="flower_worker_online for the worker")
    _status, metrics = get(flower + "/metrics", auth=None)
    assert f'flower_events_total{{task="{LATE_OBSERVE}",type="task-succeeded"' in metrics
    assert f'flower_events_total{{task="{LATE_OBSERVE}",type="task-timeout"' in metrics


def task_info(flower: str, plan: str) -> dict[str, object]:
    status, body = get(f"{flower}/api/task/info/{C.task_id(plan)}")
    return json.loads(body) if status == 200 else {}


def chromium() -> str:
    """Debian's chromium; skip without it, or fail when CI is set (.ci/run installs it)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; CI is set, so Flower's page must be checked in a browser")
        pytest.skip("chromium is not installed")
    return path


def browse(browser: str, url: str, out: Path) -> tuple[str, str]:
    """Open the page as an operator would (basic auth as a browser sends it), screenshot it; return its DOM and its
    text. The virtual time budget lets the page's scripts fill the task list (an XHR) before either is taken."""
    authed = url.replace("http://", f"http://{AUTH}@", 1)
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--hide-scrollbars", f"--user-data-dir={out.parent / 'chromium-profile'}", "--window-size=1280,1400",
            "--virtual-time-budget=10000"]
    subprocess.run([*args, f"--screenshot={out}", authed], check=True, capture_output=True, timeout=90)
    dom = subprocess.run([*args, "--dump-dom", authed], check=True, capture_output=True, text=True, timeout=90).stdout
    text = html.unescape(re.sub(r"<[^>]+>", " ", re.sub(r"(?s)<(script|style)\b.*?</\1>", " ", dom)))
    return dom, " ".join(text.split())


def task_rows(dom: str) -> list[tuple[str, str, str]]:
    """The task list's rows, top to bottom: (task id, its State badge's text, the badge's colour class)."""
    tbody = dom.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return [(row_id, state, badge) for row_id, badge, state in re.findall(
        r'<tr id="([^"]+)".*?<span class="badge ([^"]+)">([^<]+)</span>.*?</tr>', tbody, re.S)]


@pytest.mark.slow
def test_each_plans_life_in_flower_as_an_operator_sees_it(r: redis.Redis, env: dict[str, str], flower: str,
                                                         start_worker: Callable[..., Worker],
                                                         tmp_path: Path) -> None:
    browser = chromium()
    # Long enough to watch a waiting plan: the first look after a 1 s safety interval (the default, MAX_WAIT_MS,
    # would make it the only look, at the deadline: no RETRY to see), the deadline at 15 s, past the two chromium
    # runs that read the waiting page (5 s and more on the loaded shared cores: with a 6 s window, wake1's heat was
    # then written after its deadline, and quiet1's page could show its final state).
    env.update(P28_LATE_OBS_MAX_WAIT_MS="15000", P28_LATE_OBS_POLL_MS="100", P28_LATE_OBS_SAFETY_POLL_MS="1000")
    start_worker()
    poll(lambda: r.exists(C.WAKE), what="the wake path healthy")
    published = {}
    for plan in ("quiet1", "wake1"):
        assert observe_late(plan, "BTCUSDT", "EXECUTE") == "enqueued"
        published[plan] = (lease(r, plan) or {})["published_ms"]
    # Waiting: PENDING, then RETRY once the first look has found no heat.
    pending = poll(lambda: task_info(flower, "quiet1"), what="quiet1 in Flower")
    assert pending["state"] in ("PENDING", "RETRY"), pending
    assert pending["received"] == published["quiet1"] / 1000  # Received: the plan's publish time (Redis's clock)
    if pending["eta"]:  # (none when the sender just read the wake path as degraded: the first look runs at once)
        assert pending["eta"] == datetime.fromtimestamp((published["quiet1"] + 1000) / 1000, tz=UTC).isoformat()
    waiting = poll(lambda: (t := task_info(flower, "quiet1")).get("state") == "RETRY" and t, timeout=10,
                   what="quiet1 waiting (RETRY)")
    assert "Waiting(" in str(waiting["exception"]) and "next look in" in str(waiting["exception"])
    browsed_at = time.monotonic()
    _dom, page = browse(browser, f"{flower}/task/{C.task_id('quiet1')}", tmp_path / "waiting.png")
    print(f"\nwaiting page read in {time.monotonic() - browsed_at:.1f}s")
    assert "RETRY" in page and "SUCCESS" not in page and "TIMEOUT" not in page and "next look in" in page

    r.hset(HEAT + "wake1", mapping={"heat_level": "hot", "heat_action": "NONE"})
    decided = poll(lambda: (t := task_info(flower, "wake1")).get("state") == "SUCCESS" and t, what="wake1 decided")
    result = ast.literal_eval(str(decided["result"]))
    entry = next(e for e in late_entries(r) if e["plan_id"] == "wake1")
    assert result == {"reason": "ok", "wait_ms": int(entry["wait_ms"]), "recorded_by": "wake"}

    shot = tmp_path / "decided.png"
    _dom, page = browse(browser, f"{flower}/task/{C.task_id('wake1')}", shot)
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank one
    assert LATE_OBSERVE in page and C.task_id("wake1") in page
    assert "SUCCESS" in page and "RETRY" not in page and "Waiting(" not in page
    assert f"{{'reason': 'ok', 'wait_ms': {entry['wait_ms']}, 'recorded_by': 'wake'}}" in page

    # The newest plan: recorded at its admission (heat written before the call); its events come from here.
    r.hset(HEAT + "admit1", mapping={"heat_level": "hot", "heat_action": "NONE"})
    assert observe_late("admit1", "BTCUSDT", "EXECUTE") == "enqueued"
    try:
        quiet = poll(lambda: (t := task_info(flower, "quiet1")).get("state") == "TIMEOUT" and t, timeout=25,
                     what="quiet1 decided at its deadline")
    except AssertionError:  # (say whether the plan was decided and what Flower holds)
        print("quiet1:", [e for e in late_entries(r) if e["plan_id"] == "quiet1"], task_info(flower, "quiet1"))
        raise
    assert ast.literal_eval(str(quiet["result"])) == {"reason": "timeout", "wait_ms": 15000, "recorded_by": "look"}
    assert quiet["exception"] is None and quiet["runtime"] == 15.0
    poll(lambda: task_info(flower, "admit1").get("state") == "SUCCESS", what="admit1 in Flower, decided")

    # The task list as an operator opens it: newest plans first (sorted by Received, descending, by default), the
    # timeout's badge another colour than the hits' green. The order is neither the ids' nor the states'.
    shot = tmp_path / "list.png"
    dom, page = browse(browser, f"{flower}/tasks", shot)
    print(f"task list: {shot}")
    assert shot.stat().st_size > 10_000
    assert re.search(r'<th data-column="received"[^>]*class="[^"]*sorting_desc', dom), "not sorted by Received"
    rows = [row for row in task_rows(dom) if row[0] in {C.task_id(p) for p in ("admit1", "wake1", "quiet1")}]
    assert rows == [(C.task_id("admit1"), "SUCCESS", "text-bg-success"),
                    (C.task_id("wake1"), "SUCCESS", "text-bg-success"),
                    (C.task_id("quiet1"), "TIMEOUT", "text-bg-secondary")], rows
    assert LATE_OBSERVE in page and "TIMEOUT" in page and "SUCCESS" in page and "RETRY" not in page
