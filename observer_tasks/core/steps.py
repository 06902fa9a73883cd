"""Every atomic Redis step of the observer, declared as data, and the Lua that Redis runs for it.

A step is one Lua script under ``redis_scripts/``. Its declaration here names its keys, its arguments (with
their kind), and for the batch steps the keys and arguments of each plan of the batch. From it this module
generates the script's prologue: the table ``C`` of the contract's names (contract.py), ``K`` of its keys by
name, ``A`` of its arguments by name (numbers checked and converted), ``ITEMS`` of the batch, and ``now_ms()``,
Redis's TIME read once and only when a step needs it. So a hand-written step never indexes KEYS or ARGV, and
every step has one calling convention: ``Ledger.run`` (ledger.py) builds KEYS and ARGV in the declared order.

The observe steps also get observe_lib.lua (reading heat, deciding a reason, writing an entry) between the
prologue and their own file; ``probe`` (the access check) gets nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib.resources import files
from typing import Any

from .contract import lua_constants

#: The arguments every record needs: dedupe TTL (s), stream cap, debug_json cap, how late a look may see heat
#: and still count it as in time (ms), the histogram's bucket bounds (ms, comma-separated), the caller's context.
RECORD_ARGS = ("ttl_s:num", "maxlen:num", "debug_cap:num", "slack_ms:num", "buckets:str", "context:json")


@dataclass(frozen=True)
class Step:
    """One atomic step: its keys and arguments by name (``name:kind``, kind num|str|json), those of each plan
    of a batch, whether it reads the shared library, and how its reply is decoded."""

    name: str
    keys: tuple[str, ...]
    args: tuple[str, ...] = ()
    item_keys: tuple[str, ...] = ()
    item_args: tuple[str, ...] = ()
    library: bool = True
    decode: Callable[[Any], Any] = field(default=lambda reply: reply, compare=False)

    @property
    def arg_names(self) -> tuple[str, ...]:
        return tuple(a.split(":")[0] for a in self.args)

    def source(self) -> str:
        """The text Redis runs: the generated prologue, the library, the step's own file."""
        return _source(self)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def texts(reply: Any) -> list[str]:
    return [_text(v) for v in reply]


STEPS: dict[str, Step] = {step.name: step for step in (
    # The early observer at any configured point: read heat, record once per plan and point (TTL dedupe).
    # A call the apply layer could only make later than RIDE_OUT_S (`stale`) records redis_error: its look
    # at plan creation could not happen.
    Step("early", ("heat", "dedupe", "stream", "counters"),
         ("plan:str", "symbol:str", "decision:str", "obs_point:str", "stale:num", *RECORD_ARGS), decode=_text),
    # Admit a plan to late observation, or record it at once (heat already there; a deferred call whose whole
    # window passed), or refuse it (duplicate, MAX_INFLIGHT live leases, too many waiting for a worker).
    Step("admit", ("inflight", "lease", "heat", "stream", "counters", "gaps"),
         ("plan:str", "symbol:str", "decision:str", "token:str", "age_ms:num", "max_wait_ms:num", "grace_ms:num",
          "max_inflight:num", "backlog_max:num", *RECORD_ARGS), decode=texts),
    # One look of the late task: record (heat there, or the deadline passed), gone, lost, or pending.
    Step("look", ("inflight", "lease", "heat", "stream", "counters", "wake", "gaps"),
         ("plan:str", "polls:num", "errors:num", "message_deadline_ms:num", "unwatched_since_ms:num", *RECORD_ARGS),
         decode=texts),
    # Record an outcome decided outside Redis (redis_error after two failed looks).
    Step("finish", ("inflight", "lease", "stream", "counters"),
         ("plan:str", "reason:str", "polls:num", *RECORD_ARGS), decode=texts),
    # The wake listener's batch: record each plan still leased whose heat hash is there.
    Step("wake", ("inflight", "stream", "counters", "gaps"), RECORD_ARGS, ("lease", "heat"), ("plan",)),
    # A page of plans whose lease has ended (for the sweep, which then gets their keys).
    Step("overdue", ("inflight",), ("offset:num", "limit:num")),
    # Decide every given plan whose lease has ended, from the heat evidence, the gaps and the notes.
    Step("sweep", ("inflight", "stream", "counters", "gaps"), ("foreign:json", *RECORD_ARGS),
         ("lease", "heat", "unsent", "failed"), ("plan",)),
    # A worker's heartbeat: its entry, the wake path's health, a gap it saw in Redis; returns Redis ms.
    Step("heartbeat", ("workers", "wake", "gaps", "counters"),
         ("nodename:str", "state:str", "wake_state:str", "gap_start_ms:num", "health_ttl_ms:num",
          "fresh_ms:num", "forget_ms:num", "gaps_keep_ms:num", "gaps_max:num"), decode=int),
    # Counts and notes the apply layer's outbox owes Redis (refusals; why a first message was never sent).
    Step("count", ("counters",), ("counts:json",)),
    Step("note", (), ("ttl_s:num",), ("note",), ("text",)),
    # An apply process's limits, for `observer-tasks status`.
    Step("report", ("producers",), ("name:str", "state:str", "forget_ms:num"), library=False),
    # The start-up access check: runs nothing; Redis checks the user's rights on the keys it names.
    Step("probe", (), library=False),
)}

_SCRIPTS = files("observer_tasks.core.redis_scripts")
_NAME = re.compile(r"[a-z_]+")


def lua_literal(value: Any) -> str:
    """A Python constant as Lua source (strings, numbers, and lists, tuples and dicts of them)."""
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "{" + ", ".join(lua_literal(v) for v in value) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{lua_literal(k)}] = {lua_literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no Lua form for {value!r}")


def prologue(step: Step) -> str:
    """The generated head of a step: C, K, A, ITEMS and now_ms()."""
    lines = [f"-- Generated by observer_tasks/core/steps.py from the declaration of step '{step.name}': do not edit.",
             "local C = {" + ", ".join(f"{k} = {lua_literal(v)}" for k, v in lua_constants().items()) + "}"]
    keys = [f"{name} = KEYS[{i}]" for i, name in enumerate(step.keys, 1)]
    lines.append("local K = {" + ", ".join(keys) + "}")
    lines.append("local A = {}")
    for i, spec in enumerate(step.args, 1):
        name, kind = spec.split(":")
        assert _NAME.fullmatch(name), name
        if kind == "num":
            lines.append(f"A.{name} = tonumber(ARGV[{i}]) or error('step {step.name}: {name} is not a number')")
        elif kind == "json":
            lines.append(f"A.{name} = cjson.decode(ARGV[{i}])")
        else:
            lines.append(f"A.{name} = ARGV[{i}] or error('step {step.name}: missing {name}')")
    lines.append("local ITEMS = {}")
    if step.item_keys:
        nk, na, per = len(step.keys), len(step.args), len(step.item_keys)
        item = ", ".join([*(f"{n} = KEYS[{nk} + (i - 1) * {per} + {j}]" for j, n in enumerate(step.item_keys, 1)),
                          *(f"{n} = ARGV[{na} + (i - 1) * {len(step.item_args)} + {j}]"
                            for j, n in enumerate(step.item_args, 1))])
        lines.append(f"for i = 1, (#KEYS - {nk}) / {per} do ITEMS[i] = {{{item}}} end")
    lines.append("""local NOW, TS_EPOCH
local function now_ms()
  if not NOW then
    local t = redis.call('TIME')
    NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    TS_EPOCH = string.format('%d.%03d', tonumber(t[1]), math.floor(tonumber(t[2]) / 1000))
  end
  return NOW
end""")
    return "\n".join(lines) + "\n"


@cache
def _source(step: Step) -> str:
    parts = [] if step.name == "probe" else [prologue(step)]
    if step.library:
        parts.append(_SCRIPTS.joinpath("observe_lib.lua").read_text())
    parts.append(_SCRIPTS.joinpath(f"{step.name}.lua").read_text())
    return "".join(parts)


def main(argv: list[str]) -> int:
    """``python -m observer_tasks.core.steps STEP``: the step's whole text, with its KEYS and ARGV order on top,
    for ``redis-cli --eval`` (e.g. to try a step on a scratch database)."""
    if len(argv) != 1 or argv[0] not in STEPS:
        print(f"usage: python -m observer_tasks.core.steps {{{','.join(STEPS)}}}")
        return 2
    step = STEPS[argv[0]]
    print(f"-- KEYS: {' '.join(step.keys)}" + (f" then per plan: {' '.join(step.item_keys)}" if step.item_keys else ""))
    print(f"-- ARGV: {' '.join(step.args)}" + (f" then per plan: {' '.join(step.item_args)}" if step.item_args else ""))
    print(step.source())
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
