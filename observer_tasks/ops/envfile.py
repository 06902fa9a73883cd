"""Reading an env file as systemd's EnvironmentFile= does, refusing what others would read differently.

The operators' file is read by systemd (``EnvironmentFile=`` of the worker's
unit), by docker compose (``env_file:``) and, when someone debugs, by a shell
(``set -a; . FILE``). systemd.exec(5) reads it its own way: lines starting with
``#`` or ``;`` are comments, a value is stripped of the whitespace around it
but keeps interior whitespace and anything after it (``X=1 # c`` is ``1 # c``),
quotes are removed, backslashes are escapes, a trailing backslash joins the next
line, whitespace around ``=`` is ignored, and a line whose name is not a valid
name (``export X=1`` names ``export X``) is dropped with a log line only.

So the accepted form is the one that every reader reads alike: ``NAME=value``
with a bare value and nothing else on the line. Everything else is refused with
the line number and the reason; nothing is guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: Characters a POSIX shell treats specially in an unquoted assignment value, and what it does with them.
_SHELL_SPECIAL = {
    "$": "a shell expands $, systemd keeps it",
    "`": "a shell runs `...`, systemd keeps it",
    ";": "a shell ends the command at ;",
    "&": "a shell reads & as an operator",
    "|": "a shell reads | as a pipe",
    "<": "a shell reads < as a redirection",
    ">": "a shell reads > as a redirection",
    "(": "a shell reads ( as syntax",
    ")": "a shell reads ) as syntax",
}

HELP = ("plain NAME=value lines, read as systemd's EnvironmentFile= reads them; blank lines and lines "
        "starting with # are skipped. Refused (exit 2): `export`, quotes, backslashes, spaces around = or in "
        "the value, comments after a value, ; comments, $ ` ; & | < > ( ) ~, CRLF line endings")


class EnvFileError(ValueError):
    """A line systemd and a shell (or docker) would read differently; the message names the line."""


@dataclass(frozen=True)
class EnvFile:
    values: dict[str, str]
    #: The line number each variable was read from (the last one, as systemd keeps the last assignment).
    lines: dict[str, int]


def read(path: Path) -> EnvFile:
    """Parse `path`; EnvFileError (naming path:line and why) on the first line that is refused."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EnvFileError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start}); systemd refuses the file") from None
    return parse(text, str(path))


def parse(text: str, name: str = "<env>") -> EnvFile:
    values: dict[str, str] = {}
    lines: dict[str, int] = {}
    for number, line in enumerate(text.split("\n"), 1):
        why = _refusal(line)
        if why:
            raise EnvFileError(f"{name}:{number}: refused: {why}")
        body = line.strip(" \t")
        if not body or body.startswith("#"):
            continue
        key, _eq, value = body.partition("=")
        values[key], lines[key] = value, number
    return EnvFile(values, lines)


def _refusal(line: str) -> str | None:
    """Why this physical line is refused, or None when every reader reads it alike."""
    if "\0" in line:
        return "a NUL character"
    if "\ufeff" in line:
        return "a byte-order mark: systemd refuses it"
    if line.endswith("\r"):
        return "CRLF line ending: a shell keeps the carriage return in the value (convert with dos2unix)"
    if line.endswith("\\"):
        return "a backslash continuation: systemd joins the next line to this one (a shell, in a comment, does not)"
    body = line.strip(" \t")
    if not body or body.startswith("#"):
        return None
    if body.startswith(";"):
        return "a ; comment: systemd skips it, a shell does not; start comments with #"
    if body.startswith("export ") or body.startswith("export\t"):
        return ("`export NAME=...`: systemd reads the name 'export NAME', which is invalid, and drops the line; "
                "write NAME=value")
    if "=" not in body:
        return f"no '=' in {body[:40]!r}: systemd ignores the line, a shell runs it as a command"
    key, _eq, value = body.partition("=")
    if key != key.rstrip(" \t") or value != value.lstrip(" \t"):
        return "spaces around '=': systemd ignores them, a shell does not; write NAME=value"
    if not _NAME.fullmatch(key):
        return f"{key[:40]!r} is not a variable name: systemd drops the line"
    value = value.rstrip(" \t")
    if value[:1] in ("'", '"') or "'" in value or '"' in value:
        return ("a quoted value: systemd strips the quotes, docker's env_file keeps them; write the value bare "
                "(no value of the observer needs quotes)")
    if "\\" in value:
        return "a backslash: systemd and a shell read it as an escape, docker keeps it"
    if re.search(r"[ \t]#", value):
        return ("a comment after the value: systemd keeps ' #...' as part of the value; "
                "put the comment on its own line")
    if re.search(r"[ \t]", value):
        return "whitespace inside the value: systemd keeps it, a shell splits the line there"
    for ch, what in _SHELL_SPECIAL.items():
        if ch in value:
            return f"{ch!r} in the value: {what}"
    if value.startswith("~") or ":~" in value:
        return "'~' in the value: a shell expands it to a home directory, systemd keeps it"
    return None
