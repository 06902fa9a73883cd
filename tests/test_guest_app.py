"""A good guest: importing observer_tasks changes nothing of the apply layer's own Celery app (real processes).

The apply layer is a real interpreter (a subprocess) with its own ``Celery("apply", ...)`` app, its own
``celeryconfig.py`` first on ``sys.path`` and a ``@shared_task``; it imports observer_tasks, observes a plan
that a real worker records, and reports what its own app looks like before and after.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import redis

from observer_tasks.core.messages import QUEUE

from .conftest import HEAT, ROOT, Worker, late_entries, poll

APPLY = """
import json, sys
from celery import Celery, current_app, shared_task
from celery import _state

apply = Celery("apply", broker="memory://")
if sys.argv[1] == "own-config":
    apply.config_from_object("celeryconfig")  # the apply layer's own file, first on sys.path

@shared_task(name="apply.settle")
def settle(x):
    return x

def state():
    route = apply.amqp.router.route({}, "apply.settle")
    return {"current": current_app.main, "default": _state.default_app.main if _state.default_app else None,
            "task_app": settle.app.main, "broker": current_app.conf.broker_url,
            "queue": route["queue"].name, "apply_queue": apply.conf.task_default_queue}

before = state()
import observer_tasks
from observer_tasks import observe_late
result = observe_late("guest-1", "BTCUSDT", "EXECUTE")
after = state()
ours = observer_tasks.app.conf
print(json.dumps({"before": before, "after": after, "result": result, "ours": {
    "queue": ours.task_default_queue, "broker": ours.broker_url, "serializer": ours.task_serializer}}))
"""

FOREIGN_CONFIG = 'broker_url = "memory://foreign"\ntask_default_queue = "apply_q"\ntask_serializer = "pickle"\n'


def run_apply(env: dict[str, str], cwd: Path, mode: str) -> dict[str, dict[str, str]]:
    # cwd first on sys.path, as for `python app.py` run from the apply layer's directory
    proc = subprocess.run([sys.executable, "-c", APPLY, mode], cwd=cwd, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_import_leaves_the_apply_layers_app_current_and_its_shared_task_alone(
        worker: Worker, r: redis.Redis, env: dict[str, str], tmp_path: Path) -> None:
    r.hset(HEAT + "guest-1", "heat_level", "warm")
    out = run_apply(env, tmp_path, "no-config")
    assert out["before"] == out["after"], out
    assert out["after"]["current"] == "apply" and out["after"]["task_app"] == "apply"
    # The shared task still routes to the apply layer's default queue. (Its broker is Celery's to choose:
    # Celery gives CELERY_BROKER_URL, when set, to every app of the process, before and after alike.)
    assert out["after"]["queue"] == "celery"
    assert out["result"] == "enqueued"
    assert out["ours"] == {"queue": QUEUE, "broker": env["CELERY_BROKER_URL"], "serializer": "json"}
    entries = poll(lambda: late_entries(r), 15, what="the guest's plan recorded")
    # Heat written before the call: recorded by the admission itself (round-4 migration change 1).
    assert [(e["plan_id"], e["heat_reason"], e["recorded_by"]) for e in entries] == [("guest-1", "ok", "admit")]


def test_a_foreign_celeryconfig_first_on_sys_path_changes_neither_app(
        worker: Worker, r: redis.Redis, env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "celeryconfig.py").write_text(FOREIGN_CONFIG)
    out = run_apply(env, tmp_path, "own-config")
    assert out["before"] == out["after"], out
    # The apply layer's app reads its own file (not the observer's) ...
    assert out["after"]["apply_queue"] == "apply_q" and out["after"]["queue"] == "apply_q"
    # ... and the observer's app reads its own settings, not the apply layer's file.
    assert out["ours"] == {"queue": QUEUE, "broker": env["CELERY_BROKER_URL"], "serializer": "json"}
    assert out["result"] == "enqueued"
    entries = poll(lambda: late_entries(r), 15, what="the guest's plan recorded")
    # No heat: a timeout recorded by our worker (a look; its sweeper, should this loaded machine delay the
    # look past the lease), never noted as a first message that did not reach the broker.
    assert [(e["plan_id"], e["heat_reason"]) for e in entries] == [("guest-1", "timeout")]
    assert entries[0]["recorded_by"] in ("look", "sweep") and "unsent" not in entries[0]["debug_json"]


def test_the_package_installs_no_top_level_celeryconfig(tmp_path: Path) -> None:
    """Outside the repository, `import celeryconfig` finds nothing of ours (no py-module is installed)."""
    proc = subprocess.run([sys.executable, "-c", "import celeryconfig"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=30, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 1 and "No module named 'celeryconfig'" in proc.stderr
    linked = ROOT / "observer_tasks/core/celeryconfig.py"
    assert linked.is_symlink() and linked.resolve() == (ROOT / "celeryconfig.py").resolve()
