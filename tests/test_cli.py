"""The CLI end to end: make-checkpoint, then generate in each mode with --json, in process
(`trimode.cli.main`: no interpreter and torch import per command), and once through the installed
console script."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from trimode.cli import main

FIELDS = {
    "text",
    "token_ids",
    "finish_reason",
    "mode",
    "num_prompt_tokens",
    "num_generated_tokens",
    "num_forwards",
    "tokens_per_forward",
    "seconds",
}


def trimode(*args: str) -> SimpleNamespace:
    """`trimode ARGS` in this process: its exit status must be 0; returns what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(list(args))
    assert status == 0, (args, status)
    return SimpleNamespace(stdout=out.getvalue())


def test_make_checkpoint_writes_the_release_layout(tmp_path):
    out = tmp_path / "ck"
    trimode(
        "make-checkpoint",
        "--preset",
        "nld-3b",
        "--layers",
        "1",
        "--hidden",
        "64",
        "--vocab",
        "512",
        "--draft-lora-rank",
        "4",
        "--out",
        str(out),
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "nemotron_labs_diffusion" and cfg["architectures"] == ["NemotronLabsDiffusionModel"]
    assert cfg["num_attention_heads"] * cfg["head_dim"] == 4096  # the 3B's q width (> hidden) is kept
    assert cfg["rope_parameters"]["rope_type"] == "yarn" and cfg["mask_token_id"] == 100
    for f in (
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "linear_spec_lora/adapter_config.json",
        "linear_spec_lora/adapter_model.safetensors",
    ):
        assert (out / f).is_file(), f
    from trimode.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(out)
    assert tok.vocab_size == 512 and tok.decode(tok.encode("def f(x): return x")) == "def f(x): return x"


@pytest.mark.parametrize("mode", ["ar", "diffusion", "selfspec"])
def test_generate_json(tiny_dir, mode):
    proc = trimode(
        "generate",
        "--model",
        str(tiny_dir),
        "--mode",
        mode,
        "--max-tokens",
        "9",
        "--block-length",
        "4",
        "--json",
        "--ignore-eos",
        "def f():",
        "import re",
    )
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert FIELDS <= row.keys()
        assert row["mode"] == mode and row["num_generated_tokens"] == 9 == len(row["token_ids"])
        assert row["tokens_per_forward"] == pytest.approx(9 / row["num_forwards"], abs=1e-3)


def test_console_script_and_chat(tiny_dir):
    exe = shutil.which("trimode", path=str(Path(sys.executable).parent))
    assert exe is not None, "the `trimode` console script is not installed beside this Python"
    proc = subprocess.run(
        [exe, "generate", "--model", str(tiny_dir), "--chat", "--max-tokens", "5", "--json", "hello"],
        capture_output=True,
        text=True,
        check=True,
    )
    row = json.loads(proc.stdout)
    assert row["prompt"].startswith("<s><|im_start|>system\n<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n")
    assert row["prompt"].endswith("<|im_start|>assistant\n<think></think>")


def test_stop_strings_cut_the_text(llm):
    from trimode import SamplingParams

    full = llm.generate("def main():", SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))[0]
    stop = full.text[5:8]
    out = llm.generate("def main():", SamplingParams(temperature=0.0, max_tokens=20, stop=[stop], ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.text == full.text[: full.text.index(stop)]
    assert out.token_ids == full.token_ids[: len(out.token_ids)] and stop in llm.tokenizer.decode(out.token_ids)


def test_generate_says_which_prompt_each_answer_answers(tiny_dir, capsys):
    from trimode.cli import main

    assert main(["generate", "--model", str(tiny_dir), "--max-tokens", "2", "def f():", "import re"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "== prompt 1: 'def f():'" and "== prompt 2: 'import re'" in out


def test_generate_chat_and_train_flags_say_what_they_do():
    from trimode.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("generate", "chat", "train"):
        silent = [a.option_strings for a in commands[name]._actions if a.option_strings and not a.help]
        assert not silent, (name, silent)
    train_help = commands["train"].format_help()
    assert "weight of the diffusion loss in L = L_AR + alpha * L_diff (default 0.3)" in " ".join(train_help.split())
