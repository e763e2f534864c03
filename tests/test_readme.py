"""Every command in README.md runs, on the embedded model, as the README writes it.

A fenced block's info string says how: after the language, `runnable` (this file runs it), `slow`
(only in `make test-all`), `serve` (it starts a server: started here, checked, stopped), `server`
(a client of that server; it runs against the shared `tool_server`, which serves the same flags, at
its address), and `ci` for the two commands, which CI runs itself. A bash or python block with none
of these fails the first test, so no command can slip into the README untested."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import TOOL_SERVER_FLAGS
from live import MODEL, serving
from run_cli import run_cli_output

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```$", re.M | re.S)
README_URL = "http://127.0.0.1:8000"  # the address a README client talks to: `trimode serve`'s default
SHELL = re.compile(r"[|&;<>$`]")  # a command with these needs a shell, not argv


@dataclass(frozen=True)
class Block:
    lang: str
    markers: frozenset[str]
    code: str
    line: int

    @property
    def id(self) -> str:
        return f"README.md:{self.line}"

    def commands(self) -> list[str]:
        """A bash block's commands: backslash continuations joined, comments and blank lines dropped."""
        joined = self.code.replace("\\\n", " ")
        return [c for c in (line.split(" #")[0].strip() for line in joined.splitlines()) if c and c[0] != "#"]


def readme_blocks() -> list[Block]:
    text = README.read_text()
    return [
        Block(m[1], frozenset(m[2].split()), m[3], text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)
    ]


def runnable(slow: bool) -> list:
    return [
        pytest.param(b, id=b.id, marks=[pytest.mark.slow] if slow else [])
        for b in readme_blocks()
        if "runnable" in b.markers and "serve" not in b.markers and ("slow" in b.markers) == slow
    ]


def test_every_command_block_is_marked():
    """Each bash/python block is runnable, or is the two commands (`ci`), which must be the
    Makefile's targets that CI calls; a block marked `server` has a `serve` block to talk to."""
    blocks = [b for b in readme_blocks() if b.lang in ("bash", "python")]
    assert blocks
    for b in blocks:
        assert "runnable" in b.markers or b.markers == {"ci"}, f"{b.id}: mark it runnable (and slow if slow)"
    ci = [b for b in blocks if "ci" in b.markers]
    assert [c.split()[:2] for b in ci for c in b.commands()] == [["make", "run"], ["make", "test"]]
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "\nrun:" in makefile and "\ntest:" in makefile
    if any("server" in b.markers for b in blocks):
        assert any("serve" in b.markers for b in blocks)


def test_the_serve_block_matches_the_clients_server():
    """The README's clients run against `tool_server`; its flags must be the README's serve line's."""
    (serve,) = [b for b in readme_blocks() if "serve" in b.markers]
    (command,) = serve.commands()
    argv = shlex.split(command)
    assert argv[:2] == ["trimode", "serve"]
    assert tuple(argv[2:]) == TOOL_SERVER_FLAGS


@pytest.mark.slow
def test_the_serve_block_serves():
    (serve,) = [b for b in readme_blocks() if "serve" in b.markers]
    argv = shlex.split(serve.commands()[0])
    with serving(*argv[2:]) as (_, url):  # `serving` adds --port: a free one, not the README's 8000
        models = httpx.get(url + "/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [MODEL]


def run_block(block: Block, tmp_path: Path, capsys, monkeypatch, base_url: str | None) -> str:
    """Run one block in a scratch directory; its output (which must not be empty)."""
    monkeypatch.chdir(tmp_path)
    code = block.code if base_url is None else block.code.replace(README_URL, base_url)
    if block.lang == "python":
        exec(compile(code, block.id, "exec"), {"__name__": "__readme__"})
        return capsys.readouterr().out
    commands = block.commands()
    if all(c.startswith("trimode ") and not SHELL.search(c) for c in commands):
        out = []
        for command in commands:  # in this process: no interpreter start-up per command
            status, stdout, err = run_cli_output(shlex.split(command)[1:], capsys)
            assert status == 0, f"{block.id}: `{command}` exited {status}: {err}"
            out.append(stdout)
        return "".join(out)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{block.id} exited {done.returncode}: {done.stderr[-2000:]}"
    return done.stdout


@pytest.mark.parametrize("block", runnable(slow=False) + runnable(slow=True))
def test_block_runs(block: Block, tmp_path, capsys, monkeypatch, request):
    base_url = request.getfixturevalue("tool_server")[1] if "server" in block.markers else None
    assert run_block(block, tmp_path, capsys, monkeypatch, base_url).strip(), f"{block.id} printed nothing"
