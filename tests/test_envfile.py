"""envfile: what systemd's EnvironmentFile= and a shell read alike is accepted; the rest refused by line."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from observer_tasks.ops import envfile
from tests.conftest import ROOT


def test_plain_lines_comments_and_blank_lines() -> None:
    parsed = envfile.parse("# a comment\n"
                           "\n"
                           "   \t\n"
                           "  # an indented comment with a \\ inside\n"
                           "A=1\n"
                           "  B=redis://:p@ss-w0rd@h:6379/0   \n"
                           "C=obs#1\n"
                           "D=#not-a-comment\n"
                           "E=\n"
                           "A=2\n", "f.env")
    assert parsed.values == {"A": "2", "B": "redis://:p@ss-w0rd@h:6379/0", "C": "obs#1", "D": "#not-a-comment",
                             "E": ""}
    assert parsed.lines == {"A": 10, "B": 6, "C": 7, "D": 8, "E": 9}  # the last assignment wins, as in systemd


@pytest.mark.parametrize(("text", "line", "why"), [
    ("export A=1\n", 1, "`export NAME=...`: systemd reads the name 'export NAME'"),
    ("export\tA=1\n", 1, "`export NAME=...`"),
    ('A="1"\n', 1, "a quoted value: systemd strips the quotes, docker's env_file keeps them"),
    ("A='1'\n", 1, "a quoted value"),
    ("A=it's\n", 1, "a quoted value"),
    ("# c\nA=1 # c\n", 2, "a comment after the value: systemd keeps ' #...' as part of the value"),
    ("A=1\t# c\n", 1, "a comment after the value"),
    ("A = 1\n", 1, "spaces around '='"),
    ("A =1\n", 1, "spaces around '='"),
    ("A= 1\n", 1, "spaces around '='"),
    ("A=1\\\n2\n", 1, "a backslash continuation: systemd joins the next line"),
    ("# a comment \\\nA=1\n", 1, "a backslash continuation"),
    ("A=a\\b\n", 1, "a backslash: systemd and a shell read it as an escape"),
    ("A=a b\n", 1, "whitespace inside the value"),
    ("; c\n", 1, "a ; comment"),
    ("A\n", 1, "no '=' in 'A': systemd ignores the line"),
    ("1A=1\n", 1, "'1A' is not a variable name"),
    ("A-B=1\n", 1, "'A-B' is not a variable name"),
    ("A=$HOME\n", 1, "'$' in the value: a shell expands $, systemd keeps it"),
    ("A=`id`\n", 1, "'`' in the value"),
    ("A=1;B=2\n", 1, "';' in the value"),
    ("A=1|2\n", 1, "'|' in the value"),
    ("A=~/x\n", 1, "'~' in the value"),
    ("A=1\r\nB=2\r\n", 1, "CRLF line ending"),
    ("A=\ufeff1\n", 1, "a byte-order mark"),
])
def test_refused_lines_name_the_line_and_why(text: str, line: int, why: str) -> None:
    with pytest.raises(envfile.EnvFileError) as caught:
        envfile.parse(text, "f.env")
    message = str(caught.value)
    assert message.startswith(f"f.env:{line}: refused: "), message
    assert why in message
    assert "\n" not in message


def test_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "latin1.env"
    path.write_bytes(b"A=caf\xe9\n")
    with pytest.raises(envfile.EnvFileError, match="not UTF-8"):
        envfile.read(path)


def test_the_shipped_env_file_is_accepted() -> None:
    parsed = envfile.read(ROOT / "deploy" / "observer.env")
    assert parsed.values["P28_LATE_OBS_MAX_WAIT_MS"] == "2000"


def test_what_is_accepted_a_shell_reads_alike(tmp_path: Path) -> None:
    """The accepted form means the same to `set -a; . FILE` as to systemd (checked against a real sh)."""
    text = "# c\n\nA=1\n  B=redis://:p@ss@h:6379/0  \nC=obs#1\nD=#x\nE=\nF=a=b,c:d/e%f+g\n"
    path = tmp_path / "ok.env"
    path.write_text(text)
    parsed = envfile.read(path)
    script = f"set -a; . {path}; " + "; ".join(f'printf "%s\\0" "${name}"' for name in parsed.values)
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True, env={}).stdout
    assert out.split("\0")[:-1] == list(parsed.values.values())
