"""Block diffusion: the cached decoder equals a slow reference; reveal rules pinned on hand-built
logits (NVIDIA's: full-softmax confidence, >= threshold, None = one per pass)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import PROMPTS
from reference import diffusion_greedy

from trimode import SamplingParams


@pytest.mark.parametrize(
    "block_length,threshold,max_tokens", [(8, 0.9, 30), (4, 0.3, 13), (32, 0.5, 40), (8, None, 20)]
)
def test_cached_diffusion_equals_recompute_everything_reference(llm, block_length, threshold, max_tokens):
    """Tokens, passes, and each token's logprob: a seed's from its commit (or prefill) pass, a
    revealed token's from the pass that revealed it."""
    params = SamplingParams(
        temperature=0.0,
        mode="diffusion",
        max_tokens=max_tokens,
        block_length=block_length,
        threshold=threshold,
        ignore_eos=True,
        logprobs=0,
    )
    for prompt in PROMPTS[:2]:
        out = llm.generate(prompt, params)[0]
        tokens, passes, logprobs = diffusion_greedy(
            llm.model, llm.tokenizer.encode(prompt), max_tokens, block_length, threshold, llm.config.mask_token_id
        )
        assert out.token_ids == tokens
        assert out.mode_stats["denoise_passes_per_block"] == passes
        assert [p[t].logprob for p, t in zip(out.logprobs, out.token_ids)] == pytest.approx(logprobs, abs=1e-4)


def test_threshold_one_reveals_one_token_per_pass(llm):
    out = llm.generate(
        PROMPTS,
        SamplingParams(
            temperature=0.0, mode="diffusion", max_tokens=24, block_length=8, threshold=1.0, ignore_eos=True
        ),
    )
    for o in out:
        assert o.mode_stats["denoise_passes_per_block"] == [7, 7, 7]
        # 3 blocks: 21 denoise + 2 commits (the last block needs none) + prefill
        assert o.num_forwards == 1 + 21 + 2


def test_threshold_zero_fills_a_block_in_one_pass(llm):
    out = llm.generate(
        PROMPTS,
        SamplingParams(
            temperature=0.0, mode="diffusion", max_tokens=40, block_length=8, threshold=0.0, ignore_eos=True
        ),
    )
    for o in out:
        assert o.mode_stats["denoise_passes_per_block"] == [1] * 5
        assert o.num_forwards == 1 + 5 + 4
        assert o.tokens_per_forward == 4.0


def test_diffusion_stops_at_eos_without_waiting_for_the_rest_of_the_block(llm):
    """A row whose revealed EOS has no mask to its left stops denoising and finishes with 'stop'."""
    params = SamplingParams(
        temperature=0.0, mode="diffusion", max_tokens=64, block_length=8, threshold=0.0, ignore_eos=True
    )
    base = llm.generate(PROMPTS[0], params)[0]
    # Treat the 4th generated token as EOS: the run must end there, in the same block.
    eos = base.token_ids[3]
    llm.eos_token_ids.add(eos)
    try:
        out = llm.generate(
            PROMPTS[0], SamplingParams(temperature=0.0, mode="diffusion", max_tokens=64, block_length=8, threshold=0.0)
        )[0]
    finally:
        llm.eos_token_ids.discard(eos)
    first = base.token_ids.index(eos)
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.finish_reason == "stop"
    assert out.num_forwards == 2  # prefill + one denoise pass; no commit for a finished row


def denoise(passes: list[list[list[float]]], threshold: float | None) -> tuple[list[int], list[int]]:
    """One block of 3 (seed + 2 masks) over a 4-token vocabulary whose id 3 is [MASK], each denoise
    pass's (3, 4) logits given; returns the block's tokens and the denoise passes it took."""
    from trimode.decoding.base import DecodeBatch, transfer
    from trimode.decoding.diffusion import DiffusionDecoder
    from trimode.kv_cache import KVCache, KVPool
    from trimode.sampler import Sampler

    batch = DecodeBatch(
        kv=KVCache(KVPool(1, 4, 4, 1, 2, dtype=torch.float32, device="cpu"), rows=1),
        sampler=Sampler.of([SamplingParams(temperature=0.0)], torch.device("cpu")),
        seeds=torch.tensor([0]),
        remaining=torch.tensor([10]),
        eos_ids=torch.tensor([99]),
        stop_on_eos=torch.tensor([True]),
        mask_id=3,
        num_forwards=[0],
        stats=[[]],
        logprobs=[None],
        grammar=[None],
    )
    decoder = DiffusionDecoder(3, threshold)
    decoder.start(batch)
    for logits in passes:
        fwd = decoder.plan(batch)
        assert fwd.kind == "denoise"
        batch.kv.begin(fwd.tokens.shape[1])  # what the model runner does before each forward
        emission = decoder.accept(batch, torch.tensor([logits]))
        rows = emission.read(transfer([emission])[0].values)
        batch.kv.commit(emission.keep(rows), emission.keep_scratch)  # and what the step does after
        if rows[0]:
            return rows[0], batch.stats[0]
    raise AssertionError("the block was not finished by the given passes")


NEG = float("-inf")


def test_confidence_is_the_full_softmax_probability_mask_included():
    """Position 1's best candidate has 0.45 of the mass and [MASK] 0.5 (0.9 once [MASK] is removed and
    the rest renormalised); position 2's has 0.6. Under the reference's rule position 2 is the more
    confident and alone passes threshold 0.5, so position 1 waits for a second pass."""
    log = math.log
    pos1 = [log(0.45), log(0.04), log(0.01), log(0.5)]
    pos2 = [log(0.05), log(0.6), log(0.3), log(0.05)]
    first = [[0.0, 0.0, 0.0, 0.0], pos1, pos2]
    tokens, passes = denoise([first, first], threshold=0.5)
    assert tokens == [0, 1] and passes == [2]


def test_a_confidence_equal_to_the_threshold_is_revealed():
    """The reference reveals at confidence >= threshold: 0.5 exactly (two equal logits) passes 0.5."""
    half = [0.0, 0.0, NEG, NEG]  # softmax: exactly 0.5, 0.5
    sure = [0.0, NEG, NEG, NEG]  # exactly 1.0
    first = [[0.0] * 4, half, sure]
    assert denoise([first], threshold=0.5) == ([0, 0], [1])
    assert denoise([first, first], threshold=0.5 + 1e-6) == ([0, 0], [2])


def test_no_threshold_reveals_one_position_per_pass(llm):
    sure = [0.0, NEG, NEG, NEG]
    assert denoise([[[0.0] * 4, sure, sure]] * 2, threshold=None) == ([0, 0], [2])
    out = llm.generate(
        PROMPTS,
        SamplingParams(
            temperature=0.0, mode="diffusion", max_tokens=24, block_length=8, threshold=None, ignore_eos=True
        ),
    )
    assert all(o.mode_stats["denoise_passes_per_block"] == [7, 7, 7] for o in out)
