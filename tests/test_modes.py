"""Mode invariants: selfspec greedy == AR greedy; batched == unbatched; per-mode accounting."""

from __future__ import annotations

import pytest
from conftest import PROMPTS

from trimode import SamplingParams


def ids(outputs):
    return [o.token_ids for o in outputs]


@pytest.mark.parametrize("block_length", [4, 8, 32])
@pytest.mark.parametrize("lora", [True, False])
def test_selfspec_greedy_equals_ar_greedy(llm, llm_nolora, block_length, lora):
    model = llm if lora else llm_nolora
    assert model.model.has_draft_lora == lora
    ar = model.generate(PROMPTS, SamplingParams(mode="ar", max_tokens=45, ignore_eos=True))
    spec = model.generate(
        PROMPTS, SamplingParams(mode="selfspec", max_tokens=45, block_length=block_length, ignore_eos=True)
    )
    assert ids(spec) == ids(ar)
    single = model.generate(
        PROMPTS[2], SamplingParams(mode="selfspec", max_tokens=45, block_length=block_length, ignore_eos=True)
    )
    assert ids(single) == ids(ar)[2:3]
    cycles = [n for o in spec for n in o.mode_stats["tokens_per_cycle"]]
    # Not vacuous: some cycles accepted drafts, so the crop-and-continue path ran.
    assert max(cycles) > 1
    for o in spec:
        # Every cycle is 2 forwards, plus the prefill (and a lone verify when one token was left).
        assert o.num_forwards >= 1 + 2 * (len(o.mode_stats["tokens_per_cycle"]) - 1)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(mode="ar", max_tokens=37, ignore_eos=True),
        SamplingParams(mode="diffusion", max_tokens=37, block_length=8, ignore_eos=True),
        SamplingParams(mode="diffusion", max_tokens=37, block_length=32, threshold=0.5, ignore_eos=True),
        SamplingParams(mode="selfspec", max_tokens=37, block_length=8, ignore_eos=True),
    ],
    ids=["ar", "diffusion-b8", "diffusion-b32", "selfspec-b8"],
)
def test_batched_equals_unbatched(llm, params):
    batched = llm.generate(PROMPTS, params)
    alone = [llm.generate(p, params)[0] for p in PROMPTS]
    assert ids(batched) == ids(alone)
    assert [o.num_forwards for o in batched] == [o.num_forwards for o in alone]
    assert [o.mode_stats for o in batched] == [o.mode_stats for o in alone]


def test_ar_is_one_token_per_forward(llm):
    out = llm.generate(PROMPTS, SamplingParams(mode="ar", max_tokens=20, ignore_eos=True))
    assert all(o.num_forwards == 20 and o.tokens_per_forward == 1.0 for o in out)


@pytest.mark.parametrize("mode", ["ar", "diffusion", "selfspec"])
@pytest.mark.parametrize("max_tokens", [1, 7, 33])
def test_max_tokens_need_not_be_a_multiple_of_block_length(llm, mode, max_tokens):
    out = llm.generate(PROMPTS[:2], SamplingParams(mode=mode, max_tokens=max_tokens, block_length=8, ignore_eos=True))
    assert [len(o.token_ids) for o in out] == [max_tokens] * 2
    assert all(o.finish_reason == "length" for o in out)


def test_finished_row_stops_emitting(llm):
    """A row that ends early (EOS) leaves the batch; the others go on and equal their solo runs."""
    eos = next(iter(llm.eos_token_ids))
    base = llm.generate(PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True))
    # Make the first token of prompt 1 an EOS by asking for its stop: treat its first token as a stop id.
    stop_text = llm.tokenizer.decode(base[1].token_ids[:3])
    out = llm.generate(PROMPTS, SamplingParams(max_tokens=12, stop=[stop_text]) if stop_text else None)
    assert out[1].finish_reason == "stop" and len(out[1].token_ids) <= 3
    assert [o.token_ids for i, o in enumerate(out) if i != 1] == [o.token_ids for i, o in enumerate(base) if i != 1]
    assert eos not in out[1].token_ids
