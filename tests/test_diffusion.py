"""Block diffusion: the cached decoder equals a slow reference; the threshold's limits behave."""

from __future__ import annotations

import pytest
from conftest import PROMPTS
from reference import diffusion_greedy

from trimode import SamplingParams


@pytest.mark.parametrize("block_length,threshold,max_tokens", [(8, 0.9, 30), (4, 0.3, 13), (32, 0.5, 40)])
def test_cached_diffusion_equals_recompute_everything_reference(llm, block_length, threshold, max_tokens):
    params = SamplingParams(
        mode="diffusion", max_tokens=max_tokens, block_length=block_length, threshold=threshold, ignore_eos=True
    )
    for prompt in PROMPTS[:2]:
        out = llm.generate(prompt, params)[0]
        tokens, passes = diffusion_greedy(
            llm.model, llm.tokenizer.encode(prompt), max_tokens, block_length, threshold, llm.config.mask_token_id
        )
        assert out.token_ids == tokens
        assert out.mode_stats["denoise_passes_per_block"] == passes


def test_threshold_one_reveals_one_token_per_pass(llm):
    out = llm.generate(
        PROMPTS, SamplingParams(mode="diffusion", max_tokens=24, block_length=8, threshold=1.0, ignore_eos=True)
    )
    for o in out:
        assert o.mode_stats["denoise_passes_per_block"] == [7, 7, 7]
        # 3 blocks: 21 denoise + 2 commits (the last block needs none) + prefill
        assert o.num_forwards == 1 + 21 + 2


def test_threshold_zero_fills_a_block_in_one_pass(llm):
    out = llm.generate(
        PROMPTS, SamplingParams(mode="diffusion", max_tokens=40, block_length=8, threshold=0.0, ignore_eos=True)
    )
    for o in out:
        assert o.mode_stats["denoise_passes_per_block"] == [1] * 5
        assert o.num_forwards == 1 + 5 + 4
        assert o.tokens_per_forward == 4.0


def test_diffusion_stops_at_eos_without_waiting_for_the_rest_of_the_block(llm):
    """A row whose revealed EOS has no mask to its left stops denoising and finishes with 'stop'."""
    params = SamplingParams(mode="diffusion", max_tokens=64, block_length=8, threshold=0.0, ignore_eos=True)
    base = llm.generate(PROMPTS[0], params)[0]
    # Treat the 4th generated token as EOS: the run must end there, in the same block.
    eos = base.token_ids[3]
    llm.eos_token_ids.add(eos)
    try:
        out = llm.generate(PROMPTS[0], SamplingParams(mode="diffusion", max_tokens=64, block_length=8, threshold=0.0))[
            0
        ]
    finally:
        llm.eos_token_ids.discard(eos)
    first = base.token_ids.index(eos)
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.finish_reason == "stop"
    assert out.num_forwards == 2  # prefill + one denoise pass; no commit for a finished row
