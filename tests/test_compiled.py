"""Compiled forwards (engine/compiled.py) against the eager path, token for token, float32 on CPU:
every mode, with and without the draft LoRA, at batch 1 and at a batch between powers of two, and
a mixed-mode batch (whose several-part steps stay eager beside the compiled one-part ones). The
default suite runs AR and self-spec at batch 3; the rest is marked `slow` (graphs compile cold)."""

from __future__ import annotations

import pytest
import torch

from trimode.engine.model_runner import ModelRunner
from trimode.sampling_params import SamplingParams

PROMPTS = ["def main():\n    return", "import os", "class Foo(object):"]


@pytest.fixture(scope="module")
def compiled_runner(llm):
    return ModelRunner(llm.model, compile=True)


def _generate(llm, runner, prompts, params):
    eager, llm.runner = llm.runner, runner
    try:
        return [o.token_ids for o in llm.generate(prompts, params)]
    finally:
        llm.runner = eager


def _same_tokens(llm, runner, prompts, mode):
    params = SamplingParams(mode=mode, max_tokens=12, block_length=4, ignore_eos=True)
    assert _generate(llm, runner, prompts, params) == [o.token_ids for o in llm.generate(prompts, params)]


def test_compiled_forwards_give_the_eager_tokens(llm, compiled_runner):
    """Self-spec at batch 3 (between powers of two): its prefill, drafts (LoRA on) and verifies.
    Each graph compiles the first time (some 10 s each on a cold cache): the rest is `slow`."""
    _same_tokens(llm, compiled_runner, PROMPTS, "selfspec")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ar", "diffusion", "selfspec"])
def test_compiled_forwards_give_the_eager_tokens_at_batch_1_and_in_diffusion(llm, compiled_runner, mode):
    for prompts in (PROMPTS[:1], PROMPTS):
        _same_tokens(llm, compiled_runner, prompts, mode)


@pytest.mark.slow
def test_compiled_without_the_draft_lora_and_mixed_modes(llm, llm_nolora):
    spec = SamplingParams(mode="selfspec", max_tokens=12, block_length=4, ignore_eos=True)
    runner = ModelRunner(llm_nolora.model, compile=True)
    assert _generate(llm_nolora, runner, PROMPTS, spec) == [o.token_ids for o in llm_nolora.generate(PROMPTS, spec)]
    mixed = [
        SamplingParams(mode=m, max_tokens=10, block_length=4, ignore_eos=True) for m in ("ar", "diffusion", "selfspec")
    ]
    assert _generate(llm, ModelRunner(llm.model, compile=True), PROMPTS, mixed) == [
        o.token_ids for o in llm.generate(PROMPTS, mixed)
    ]


def test_a_compiled_forward_refuses_a_view_it_cannot_take(llm, compiled_runner):
    kv = llm.runner.new_cache(1, 32)
    positions, span = kv.begin(3)  # batch 1 on fresh pages: a `run` view, not gathered
    from trimode.model.transformer import ForwardContext, Part

    part = Part(torch.zeros(1, 3, dtype=torch.long), ForwardContext(positions, None, kv.view))
    with pytest.raises(ValueError, match="gather=True"):
        compiled_runner.compiled(part)
