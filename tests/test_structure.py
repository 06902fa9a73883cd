"""The package's shape and its facts defined once: a second definition of a key name, the task id or a metric
name fails here, as a copy of the contract's names in a Lua script fails test_record.py."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

from observer_tasks.worker.metrics import FAMILIES, REDIS_UP

from .conftest import ROOT

PACKAGE = ROOT / "observer_tasks"
CONTRACT = PACKAGE / "core/contract.py"
#: The one place for every default (the stream's and the heat prefix's names among them).
SETTINGS = PACKAGE / "core/settings.py"
MAX_LINES = 300


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def code_strings(path: Path) -> Iterator[str]:
    """The string literals of a module's code, docstrings left out (they may name a key to explain it)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.value


def test_no_module_is_over_300_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_the_observers_key_names_are_written_only_in_the_contract() -> None:
    # The observer's own keys (quantum:p28:..., the dedupe prefix): contract.py. Other systems' names the ops
    # tools read (the apply layer's and HeatBridge's streams) are not the observer's and may stand where used.
    owned = re.compile(r"quantum:(p28:|dedupe:)")
    elsewhere = {str(p.relative_to(ROOT)): s for p in modules() if p != CONTRACT
                 for s in code_strings(p) if owned.search(s)}
    assert not elsewhere, elsewhere


def test_tests_take_the_observers_key_names_from_the_package() -> None:
    # The chaos soak's checker and HeatBridge stand-in name keys themselves on purpose: they trust nothing of
    # the observer's, its code included.
    owned = re.compile(r"quantum:(p28:|dedupe:)")
    tests = [p for p in (ROOT / "tests").glob("*.py") if p.name != Path(__file__).name]
    written = {p.name: s for p in tests for s in code_strings(p) if owned.search(s)}
    assert not written, written


def test_the_task_id_is_made_only_in_the_contract() -> None:
    elsewhere = {str(p.relative_to(ROOT)): s for p in modules() if p != CONTRACT
                 for s in code_strings(p) if "p28-late" in s}
    assert not elsewhere, elsewhere


def test_every_metric_name_in_the_package_is_one_of_the_table() -> None:
    """Metrics are built once from worker/metrics.py's table; ops code that reads a family by name must name
    one of those (a renamed metric then fails here, not on an operator's screen)."""
    names = [family[0] for family in (REDIS_UP, *FAMILIES)]
    assert len(names) == len(set(names)), names
    suffixes = ("", "_total", "_bucket", "_count", "_sum", "_created")
    metric = re.compile(r"^p28_[a-z_]+$")
    unknown = {str(p.relative_to(ROOT)): s for p in modules() for s in code_strings(p)
               if metric.match(s) and not any(s == n + x for n in names for x in suffixes)}
    assert not unknown, unknown
