"""The docs' commands run as written; the paths, tests, anchors and variables the docs name exist.

Convention for README.md and docs/*.md:

- ``<!-- runnable -->`` on the line right before a fenced block: this test runs the block with bash
  (``set -o pipefail``) against the test Redis and a real worker, and expects exit status 0.
- ``<!-- output -->`` on the line right before the fenced block that follows a runnable block: that
  block's expected output. Each of its non-blank lines must end some line of the real output, compared
  with whitespace runs collapsed and control characters removed (as a terminal shows them), ``...``
  matching anything and each free-standing number (one not glued to a letter or ``_``) matching any
  number: the docs show a real run's figures, the test's differ. A number right after a setting's name
  (``P28_LATE_OBS_POLL_MS=100``, or ``P28_LATE_OBS_POLL_MS 100`` in a table) is that setting's value with
  the stage's defaults and must match exactly (the test's defaults are the code's: see the tests at the end).
- ``<!-- not runnable: why -->``: a block that cannot run here (systemd, the host's env file). Every
  fenced shell block starting with ``observer-tasks``, ``celery -A observer_tasks`` or ``redis-cli`` must
  carry one of the two markers, so no documented command escapes this test unnoticed.

Before running, a block is rewritten for the test: ``redis-cli`` talks to the test Redis and database
(TEST_REDIS_HOST/PORT, TEST_DATA_DB), ``localhost:8043`` becomes the test worker's /metrics port,
``/etc/quantum/apply-layer.env`` a copy of deploy/observer.env pointing at the test Redis. Commands that
serve until stopped (``celery -A observer_tasks worker``, ``observer-tasks metrics``) are started, waited
on until their expected lines appear, stopped with SIGTERM and expected to exit 0.

The data: one worker with the default settings (conftest's Worker, shared by the module to keep the
test well under a minute) observes six plans, three of which get heat, and HeatBridge's stream has its
consumer group, so every documented check has something to read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shlex
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from observer_tasks import observe, observe_late
from observer_tasks.client import producer
from observer_tasks.core.settings import Settings

from .conftest import (
    BROKER_URL,
    DATA_URL,
    HEAT,
    REDIS_HOST,
    REDIS_PORT,
    ROOT,
    STREAM,
    Worker,
    free_port,
    inflight,
    poll,
)

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PREFIXES = ("observer-tasks", "celery -A observer_tasks", "redis-cli")
#: Commands that serve until stopped: started, checked, stopped.
SERVICES = ("celery -A observer_tasks worker", "observer-tasks metrics")
#: Paths the docs name that a command writes (not in the repository until it runs).
GENERATED = {"benchmarks/results/latest.json"}
DATA_DB = DATA_URL.rsplit("/", 1)[1]
BIN = Path(sys.executable).parent


@dataclasses.dataclass
class Block:
    doc: Path
    line: int  # of the opening fence, 1-based
    text: str
    marker: str  # 'runnable', 'output', 'not runnable', or ''
    expected: list[str] = dataclasses.field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def blocks(doc: Path) -> list[Block]:
    """The fenced blocks of a markdown file (indented ones too), each with the marker on the line before."""
    lines = doc.read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```", lines[i])
        if not fence:
            i += 1
            continue
        indent = len(fence.group(1))
        before = lines[i - 1].strip() if i else ""
        marker = re.match(r"<!--\s*(runnable|output|not runnable)\b", before)
        body = []
        j = i + 1
        while j < len(lines) and not re.match(r"^\s*```\s*$", lines[j]):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        out.append(Block(doc, i + 1, "\n".join(body), marker.group(1) if marker else ""))
        i = j + 1
    for prev, block in zip(out, out[1:], strict=False):
        if block.marker == "output":
            assert prev.marker == "runnable", f"{block.name}: an output block must follow a runnable one"
            prev.expected = [line for line in block.text.splitlines() if line.strip()]
    return out


ALL = [b for doc in DOCS for b in blocks(doc)]
RUNNABLE = [b for b in ALL if b.marker == "runnable"]


def first_command(text: str) -> str:
    return next((ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")), "")


def norm(text: str) -> str:
    text = "".join(ch for ch in text if ch.isprintable() or ch in " \t")
    return " ".join(text.split())


#: Settings whose value the test's stage sets itself: their documented figures are examples.
STAGE_SET = ("P28_METRICS_PORT",)


def pattern(expected: str) -> re.Pattern[str]:
    # A figure right after a setting's name (`P28_X=100`, `P28_X 100`) is that setting's value with the
    # stage's defaults, so it must be exact; other figures are a real run's and match any number.
    parts = re.split(r"(\.\.\.|P28_[A-Z0-9_]*[A-Z0-9][= ]\d+(?:\.\d+)*|(?<![A-Za-z_])\d+(?:\.\d+)*)", norm(expected))
    number = r"\d+(?:\.\d+)*"

    def part(p: str) -> str:
        if p == "...":
            return ".*"
        if p.startswith("P28_"):
            name, sep, _value = re.split(r"([= ])", p, maxsplit=1)
            return re.escape(p) if name not in STAGE_SET else re.escape(name + sep) + number
        return number if p and p[0].isdigit() else re.escape(p)

    return re.compile("".join(part(p) for p in parts) + "$")


def missing_lines(expected: list[str], output: str) -> list[str]:
    actual = [norm(line) for line in output.split("\n")]  # not splitlines(): it splits at awk's SUBSEP too
    return [e for e in expected if not any(pattern(e).search(a) for a in actual)]


# -- the stage: test Redis, a worker, data --------------------------------------------------------


@dataclasses.dataclass
class Stage:
    env: dict[str, str]
    port: int
    env_file: Path
    tmp: Path


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stage]:
    tmp = tmp_path_factory.mktemp("docs")
    r = redis.Redis.from_url(DATA_URL)
    r.flushdb()
    redis.Redis.from_url(BROKER_URL).flushdb()
    base = {k: v for k, v in os.environ.items()
            if not (k.startswith("P28_") or k in ("REDIS_URL", "CELERY_BROKER_URL"))}
    env = {**base, "REDIS_URL": DATA_URL, "CELERY_BROKER_URL": BROKER_URL, "PATH": f"{BIN}:{base.get('PATH', '')}"}
    worker = Worker({"REDIS_URL": DATA_URL, "CELERY_BROKER_URL": BROKER_URL}, [], tmp / "worker.log")
    try:
        worker.wait_ready()
        env["P28_METRICS_PORT"] = str(worker.metrics_port)
        with pytest.MonkeyPatch.context() as mp:
            for name in [n for n in os.environ if n.startswith("P28_")]:
                mp.delenv(name)
            mp.setenv("REDIS_URL", DATA_URL)
            mp.setenv("CELERY_BROKER_URL", BROKER_URL)
            producer.reset()
            plans = [f"docs-{uuid.uuid4().hex[:6]}-{i}" for i in range(6)]
            for plan in plans:
                assert observe(plan, "BTCUSDT", "EXECUTE") == "missing"
                assert observe_late(plan, "BTCUSDT", "EXECUTE") == "enqueued"
            for plan in plans[::2]:  # HeatBridge writes three of them; the wake step records them
                r.hset(HEAT + plan, mapping={"heat_level": "hot", "heat_action": "NONE"})
            producer.reset()
        poll(lambda: inflight(r) == 0 and r.xlen(STREAM) == 12, timeout=20, what="the six plans recorded")
        assert inflight(r) == 0
        r.xadd("quantum:stream:harvest.heat.decision", {"plan_id": plans[0]})
        r.xgroup_create("quantum:stream:harvest.heat.decision", "heat_bridge", id="0")
        env_file = tmp / "apply-layer.env"
        shipped = (ROOT / "deploy/observer.env").read_text()
        env_file.write_text(re.sub(r"(?m)^REDIS_URL=.*$", f"REDIS_URL={DATA_URL}", shipped))
        yield Stage(env, worker.metrics_port, env_file, tmp)
    finally:
        worker.stop()


def rewrite(text: str, stage: Stage) -> str:
    text = re.sub(r"\bredis-cli\b", f"redis-cli -h {REDIS_HOST} -p {REDIS_PORT} -n {DATA_DB}", text)
    text = re.sub(r"\b(localhost|127\.0\.0\.1):8043\b", f"127.0.0.1:{stage.port}", text)
    return text.replace("/etc/quantum/apply-layer.env", str(stage.env_file))


def run_service(block: Block, command: str, stage: Stage) -> None:
    env = {**stage.env, "P28_METRICS_PORT": str(free_port())}
    argv = shlex.split(command)
    if argv[:4] == ["celery", "-A", "observer_tasks", "worker"]:
        argv += ["-n", f"docs-{uuid.uuid4().hex[:8]}@%h"]
    log_path = stage.tmp / f"service-{block.line}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            assert block.expected, f"{block.name}: a service block needs the output that shows it is up"
            # A worker logs its start-up lines while it is being built, before it handles SIGTERM: wait
            # for the /metrics line too (the services step's start, after Celery's signal handlers).
            up = [*block.expected, "observer_tasks: /metrics served on ..."] if "worker" in argv else block.expected
            poll(lambda: proc.poll() is not None or not missing_lines(up, log_path.read_text()),
                 timeout=30, interval=0.1, what=f"{block.name} up")
            output = log_path.read_text()
            assert proc.poll() is None, f"{block.name} exited early:\n{output}"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                code = proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                code = proc.wait(5)
    assert code == 0, f"{block.name}: exit {code} after SIGTERM:\n{log_path.read_text()}"


#: Blocks that only read the system's state (safe to run again while it settles).
READ_ONLY = ("observer-tasks status",)


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.name for b in RUNNABLE])
def test_runnable_blocks_work_as_written(block: Block, stage: Stage) -> None:
    command = rewrite(block.text, stage)
    if first_command(block.text).startswith(SERVICES):
        run_service(block, first_command(command), stage)
        return

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", "set -o pipefail\n" + command], cwd=ROOT, env=stage.env,
                              capture_output=True, text=True, timeout=30)

    done = run()
    if first_command(block.text).startswith(READ_ONLY):
        # A read-only report shows the system as it is now: a worker that an earlier block stopped keeps a
        # fresh heartbeat (with its listener closed) until it ages out. Read again until the state settles.
        def settled() -> bool:
            nonlocal done
            if done.returncode == 0 and not missing_lines(block.expected, done.stdout + done.stderr):
                return True
            done = run()
            return False

        with contextlib.suppress(AssertionError):  # the assertions below say what is missing
            poll(settled, timeout=20, interval=0.5, what=f"{block.name}'s output")
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{block.name}: exit {done.returncode}\n$ {command}\n{output}"
    missing = missing_lines(block.expected, output)
    assert not missing, f"{block.name}: lines not in the output: {missing}\n$ {command}\n{output}"


def test_every_documented_command_is_marked() -> None:
    unmarked = [b.name for b in ALL if b.marker == "" and first_command(b.text).startswith(PREFIXES)]
    assert not unmarked, f"mark these <!-- runnable --> or <!-- not runnable: why -->: {unmarked}"
    assert len(RUNNABLE) >= 10


# -- what the docs name ---------------------------------------------------------------------


def doc_texts() -> Iterator[tuple[Path, str]]:
    for doc in DOCS:
        yield doc, doc.read_text()


def test_every_repository_path_named_exists() -> None:
    named = re.compile(r"(?<![\w/.:-])((?:observer_tasks|docs|deploy|tests|benchmarks)/[\w./-]*\w)")
    missing = []
    for doc, text in doc_texts():
        for path in set(named.findall(text)):
            if path not in GENERATED and not (ROOT / path).exists():
                missing.append(f"{doc.name}: {path}")
        for target in re.findall(r"\]\(([^)#\s]+)", text):  # markdown links, relative to the doc
            if not target.startswith(("http://", "https://")) and not (doc.parent / target).exists():
                missing.append(f"{doc.name}: link {target}")
    assert not missing, missing


def test_every_test_named_exists() -> None:
    missing = []
    for doc, text in doc_texts():
        for file, name in set(re.findall(r"(?:tests/)?(test_\w+\.py)::(\w+)", text)):
            path = ROOT / "tests" / file
            if not path.exists() or not re.search(rf"^def {name}\(", path.read_text(), re.M):
                missing.append(f"{doc.name}: {file}::{name}")
    assert not missing, missing


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    text = re.sub(r"(?ms)^\s*```.*?^\s*```", "", doc.read_text())
    return {slug(h) for h in re.findall(r"(?m)^#+\s+(.*)$", text)}


def test_every_anchor_resolves() -> None:
    from tests.test_rules_promtool import RUNBOOK_BASE

    # The rules' runbook_url are absolute, under the docs' base: the repository path follows the base.
    rules = (ROOT / "docs/prometheus/late-observer-rules.yml").read_text().replace(RUNBOOK_BASE + "/", "")
    sources = [*doc_texts(), (ROOT / "docs/prometheus/late-observer-rules.yml", rules)]
    broken = []
    for doc, text in sources:
        for target, anchor in re.findall(r"([\w./-]*\.md)?#([a-z0-9][\w-]*)", text):
            if target == "" and doc.suffix != ".md":
                continue
            path = (doc.parent / Path(target).name) if target else doc
            if target.startswith("docs/") or (target and not path.exists()):
                path = ROOT / target  # named from the repository's root (the rules file, README)
            if not path.exists() or anchor not in anchors(path):
                broken.append(f"{doc.name}: {target}#{anchor}")
    assert not broken, broken


def test_every_variable_named_is_a_setting() -> None:
    known = {f.metadata["env"] for f in dataclasses.fields(Settings)}
    test_vars = set(re.findall(r"[\"'](TEST_\w+)[\"']", (ROOT / "tests/conftest.py").read_text()))
    unknown = []
    for doc, text in doc_texts():
        for name in set(re.findall(r"\b(P28_[A-Z0-9_]*[A-Z0-9]|REDIS_URL|CELERY_BROKER_URL)\b", text)):
            if name not in known:
                unknown.append(f"{doc.name}: {name}")
        for name in set(re.findall(r"\b(TEST_[A-Z0-9_]*[A-Z0-9])\b", text)):
            if name not in test_vars:
                unknown.append(f"{doc.name}: {name} (not read by tests/conftest.py)")
    assert not unknown, unknown


def test_the_module_map_is_the_tree() -> None:
    """docs/architecture.md's tree names every module and script of the package, each under its folder."""
    text = (ROOT / "docs/architecture.md").read_text()
    block = text.split("## Modules by role", 1)[1].split("```", 2)[1]
    listed, folders = set(), []
    for line in block.splitlines()[1:]:
        name = line.strip().split(" ", 1)[0]
        if not name:
            continue
        depth = (len(line) - len(line.lstrip())) // 2
        folders = folders[:depth]
        if name == "redis_scripts/":  # the scripts are listed by name in its line
            listed.add("/".join([*folders, name]))
        elif name.endswith("/"):
            folders.append(name.rstrip("/"))
        else:
            listed.add("/".join([*folders, name]))
    package = ROOT / "observer_tasks"
    actual = {f"observer_tasks/{p.relative_to(package).as_posix()}" for p in package.rglob("*.py")
              if p.name != "__init__.py" or p.parent == package}
    actual |= {f"observer_tasks/{p.relative_to(package).parent.as_posix()}/" for p in package.rglob("*.lua")}
    assert listed == {*actual, "celeryconfig.py"}, sorted(listed ^ {*actual, "celeryconfig.py"})


# -- the documented figures are the code's ---------------------------------------------------------


def table_rows(text: str, first_cells: set[str]) -> dict[str, list[str]]:
    """The rows of a markdown table whose first cell is one of first_cells: first cell -> the other cells."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] in first_cells:
            assert cells[0] not in rows, f"{cells[0]} documented twice"
            rows[cells[0]] = cells[1:]
    return rows


def numbers(text: str) -> list[float]:
    return [float(n) for n in re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])", text.replace("–", " – "))]


def test_documented_defaults_and_bounds_are_the_settings() -> None:
    """configuration.md's settings table against Settings(): every variable once, its default and its bounds."""

    fields = {f.metadata["env"]: f for f in dataclasses.fields(Settings)}
    rows = table_rows((ROOT / "docs/configuration.md").read_text(), set(fields))
    assert set(rows) == set(fields), f"not in the table: {sorted(set(fields) - set(rows))}"
    defaults = Settings()
    wrong = []
    for env, (documented, bounds, _meaning) in rows.items():
        f = fields[env]
        value = getattr(defaults, f.name)
        if env == "CELERY_BROKER_URL":
            ok = value == "" and documented == "(REDIS_URL)" and defaults.broker == defaults.redis_url
        elif env == "P28_LATE_OBS_SAFETY_POLL_MS":  # 0 means unset: the derived value (MAX_WAIT_MS) is documented
            ok = value == 0 and numbers(documented) == [defaults.late_obs_max_wait_ms] == [defaults.safety_poll_ms]
        elif env == "P28_LATE_OBS_BROKER_URL":
            ok = value == "" and documented == "(not set)"
        elif isinstance(value, bool):
            ok = documented == str(value).lower() and bounds == "boolean"
        else:
            ok = documented == str(value)
        # SAFETY_POLL_MS's bounds are POLL_MS..MAX_WAIT_MS (checked in __post_init__), not its field's 0..hi.
        relative = env == "P28_LATE_OBS_SAFETY_POLL_MS" and bounds.startswith("POLL_MS..MAX_WAIT_MS")
        lo_hi = [f.metadata["lo"], f.metadata["hi"]]
        if f.metadata["lo"] is not None and not relative and numbers(bounds)[:2] != lo_hi:
            ok = False
        if not ok:
            wrong.append(f"{env}: documented {documented!r} / {bounds!r}, code {value!r} "
                         f"({f.metadata['lo']}..{f.metadata['hi']})")
    assert not wrong, wrong


def test_readme_defaults_are_the_settings() -> None:
    """README's short settings table (the common ones; configuration.md has all): each with the default
    Settings() has."""
    fields = {f.metadata["env"]: f for f in dataclasses.fields(Settings)}
    rows = table_rows((ROOT / "README.md").read_text(), set(fields))
    assert len(rows) >= 10
    fields = {env: f for env, f in fields.items() if env in rows}
    d = Settings()
    shown = {env: cells[0] for env, cells in rows.items()}
    code = {env: str(getattr(d, f.name)).lower() if isinstance(getattr(d, f.name), bool) else str(getattr(d, f.name))
            for env, f in fields.items()}
    # The two that default to a derived value: the broker is REDIS_URL, the safety interval its clamped default.
    code["CELERY_BROKER_URL"], code["P28_LATE_OBS_SAFETY_POLL_MS"] = "REDIS_URL", str(d.safety_poll_ms)
    code["P28_LATE_OBS_BROKER_URL"] = "(not set)" if not d.late_obs_broker_url else d.late_obs_broker_url
    assert {env: code[env] for env in shown} == shown


def test_documented_timings_are_the_code() -> None:
    """configuration.md's interlocked timings against the constants and the derived values with the defaults."""
    from observer_tasks.core import timings as T

    text = (ROOT / "docs/configuration.md").read_text().split("## Interlocked timings", 1)[1]
    d = Settings()
    expected = {
        "sweeper grace (`Settings.sweep_grace_ms`)": ("with the defaults", [d.sweep_grace_ms]),
        "visibility timeout (`Settings.visibility_timeout_s`, Redis broker)": ("with the defaults",
                                                                               [d.visibility_timeout_s]),
        "CALL_TIMEOUT_S": ("", [T.CALL_TIMEOUT_S]),
        "outbox (`client/outbox.py`)": ("", [T.OUTBOX_MAX, T.OUTBOX_TIMEOUT_S, T.RETRY_S * 1000, T.RETRY_MAX_S,
                                            T.HOLD_S, T.RECHECK_WINDOW_S]),
        "ride-out": ("", [T.RIDE_OUT_S]),
        "sender (`client/sender.py`)": ("", [T.PUBLISH_TIMEOUT_S, T.BROKER_PATIENCE_S, T.EXIT_FLUSH_S]),
        "breaker": ("", [T.BREAKER_FIRST_OPEN_S, T.BREAKER_MAX_OPEN_S]),
        "LOOKUP_TIMEOUT_S": ("", [T.LOOKUP_TIMEOUT_S]),
        "SCRAPE_REDIS_TIMEOUT_S": ("", [T.SCRAPE_REDIS_TIMEOUT_S]),
        "RECORD_PATIENCE_S": ("", [T.RECORD_PATIENCE_S]),
        "SWEEP_INTERVAL_S": ("", [T.SWEEP_INTERVAL_S]),
        "HEARTBEAT_S": ("", [T.HEARTBEAT_S]),
        "GAP_MIN_MS": ("", [T.GAP_MIN_MS]),
        "WAKE_HEALTH_TTL_MS": ("", [T.WAKE_HEALTH_TTL_MS]),
        "WAKE_PING_S / WAKE_SILENT_S": ("", [T.WAKE_PING_S, T.WAKE_SILENT_S]),
        "WORKER_STALE_MS / WORKER_FORGET_MS": ("", [T.WORKER_STALE_MS, T.WORKER_FORGET_MS]),
        "STREAM_MAXLEN": ("", [T.STREAM_MAXLEN]),
    }
    rows = table_rows(text, set(expected))
    assert set(rows) == set(expected), f"not in the table: {sorted(set(expected) - set(rows))}"
    wrong = []
    for name, (after, values) in expected.items():
        cell = rows[name][0]
        # A derived value: the figure "with the defaults" (the formula is checked by test_settings.py).
        shown = numbers(cell.split(after)[0].rsplit(":", 1)[1]) if after else numbers(cell)
        if shown != values:
            wrong.append(f"{name}: documented {cell!r}, code {values}")
    assert not wrong, wrong
