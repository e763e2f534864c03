"""Tiny random checkpoints in the real release format, written once per test session."""

from __future__ import annotations

import collections
import dataclasses
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from trimode import LLM, SamplingParams
from trimode.checkpoint import make_checkpoint, preset_config
from trimode.config import RopeConfig
from trimode.outputs import GenerationOutput

# Compiled programs of the test models (tests/test_compiled.py) persist between runs of this checkout;
# every other test runs eager whatever the user's own cache holds (its LLMs say compile=False, and
# LLM()'s "auto" looks only here, where the embedded model is never compiled).
os.environ["TRIMODE_CACHE_DIR"] = str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "trimode-compiled")

# Small original context so positions past it exercise YaRN interpolation and Llama-4 query scaling.
PARITY_ROPE = RopeConfig(factor=4.0, original_max_position_embeddings=32, rope_theta=10000.0)


def tiny_config(**changes):
    return dataclasses.replace(preset_config("tiny"), **changes)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tiny preset + a random draft LoRA, float32 weights, with drafts that are sometimes right.

    A random model's draft almost never agrees with its verifier, which would leave the accept-and-crop
    paths of self-speculation untested. Random tiny models fall into repeating one token; giving the
    mask token that token's embedding makes drafts agree once generation settles into the repeat, so
    cycles accept 0, some, or all drafts."""
    path = make_checkpoint(tiny_config(), tmp_path_factory.mktemp("tiny"), seed=0, dtype="float32", draft_lora_rank=8)
    ar = LLM(path, dtype="float32", device="cpu", compile=False).generate(
        PROMPTS, SamplingParams(temperature=0.0, max_tokens=45, ignore_eos=True)
    )
    repeated = collections.Counter(t for o in ar for t in o.token_ids).most_common(1)[0][0]
    weights = load_file(path / "model.safetensors")
    embed = weights["encoder.embed_tokens.weight"]
    embed[MASK_ID] = embed[repeated]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture(scope="session")
def parity_dir(tmp_path_factory):
    cfg = tiny_config(num_hidden_layers=3, max_position_embeddings=128, rope=PARITY_ROPE)
    return make_checkpoint(cfg, tmp_path_factory.mktemp("parity"), seed=1, dtype="float32")


@pytest.fixture(scope="session")
def llm(tiny_dir):
    torch.manual_seed(0)
    return LLM(tiny_dir, dtype="float32", device="cpu", compile=False)


@pytest.fixture(scope="session")
def llm_nolora(tiny_dir):
    return LLM(tiny_dir, dtype="float32", device="cpu", load_draft_lora=False, compile=False)


MASK_ID = 100
PROMPTS = ["def main():\n    return", "import os", "class Foo(object):\n    def __init__(self, x, y):", "x ="]


def fake_output(prompt_ids: list[int], mode: str, n: int, num_forwards: int, **extra) -> GenerationOutput:
    """What a fake model returns for one prompt in the bench tests: n tokens, one per millisecond."""
    return GenerationOutput(
        prompt=None,
        prompt_token_ids=prompt_ids,
        text="x",
        token_ids=[7] * n,
        finish_reason="length",
        mode=mode,
        num_forwards=num_forwards,
        seconds=extra.pop("seconds", 0.0),
        token_times=[0.001 * (i + 1) for i in range(n)],
        **extra,
    )


# The tool-call flags of `tool_server`: README.md's `trimode serve` line starts its server with them.
TOOL_SERVER_FLAGS = ("--tool-call-parser", "hermes", "--enable-auto-tool-choice")


@pytest.fixture(scope="session")
def tool_server():
    """The embedded model served with the hermes tool-call parser (its template's format) reading
    calls under every tool_choice: (process, base URL), shared by the server tests that need it."""
    from live import MODEL, start_server

    from trimode.llm import EMBEDDED_MODEL_DIR

    proc, url = start_server(str(EMBEDDED_MODEL_DIR), "--served-model-name", MODEL, "--seed", "0", *TOOL_SERVER_FLAGS)
    yield proc, url
    proc.terminate()
    proc.wait(timeout=10)
