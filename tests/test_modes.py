"""Mode invariants: selfspec greedy == AR greedy; batched == unbatched; per-mode accounting."""

from __future__ import annotations

import pytest
import torch
from conftest import MASK_ID, PROMPTS

from trimode import SamplingParams


def ids(outputs):
    return [o.token_ids for o in outputs]


@pytest.mark.parametrize("block_length", [4, 8, 32])
@pytest.mark.parametrize("lora", [True, False])
def test_selfspec_greedy_equals_ar_greedy(llm, llm_nolora, block_length, lora):
    model = llm if lora else llm_nolora
    assert model.model.has_draft_lora == lora
    ar = model.generate(PROMPTS, SamplingParams(temperature=0.0, mode="ar", max_tokens=45, ignore_eos=True))
    spec = model.generate(
        PROMPTS,
        SamplingParams(temperature=0.0, mode="selfspec", max_tokens=45, block_length=block_length, ignore_eos=True),
    )
    assert ids(spec) == ids(ar)
    single = model.generate(
        PROMPTS[2],
        SamplingParams(temperature=0.0, mode="selfspec", max_tokens=45, block_length=block_length, ignore_eos=True),
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
        SamplingParams(temperature=0.0, mode="ar", max_tokens=37, ignore_eos=True),
        SamplingParams(temperature=0.0, mode="diffusion", max_tokens=37, block_length=8, ignore_eos=True),
        SamplingParams(
            temperature=0.0, mode="diffusion", max_tokens=37, block_length=32, threshold=0.5, ignore_eos=True
        ),
        SamplingParams(temperature=0.0, mode="selfspec", max_tokens=37, block_length=8, ignore_eos=True),
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
    out = llm.generate(PROMPTS, SamplingParams(temperature=0.0, mode="ar", max_tokens=20, ignore_eos=True))
    assert all(o.num_forwards == 20 and o.tokens_per_forward == 1.0 for o in out)


@pytest.mark.parametrize("mode", ["ar", "diffusion", "selfspec"])
@pytest.mark.parametrize("max_tokens", [1, 7, 33])
def test_max_tokens_need_not_be_a_multiple_of_block_length(llm, mode, max_tokens):
    out = llm.generate(
        PROMPTS[:2], SamplingParams(temperature=0.0, mode=mode, max_tokens=max_tokens, block_length=8, ignore_eos=True)
    )
    assert [len(o.token_ids) for o in out] == [max_tokens] * 2
    assert all(o.finish_reason == "length" for o in out)


def test_finished_row_stops_emitting(llm):
    """A row that ends early (EOS) leaves the batch; the others go on and equal their solo runs."""
    eos = next(iter(llm.eos_token_ids))
    base = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    # Make the first token of prompt 1 an EOS by asking for its stop: treat its first token as a stop id.
    stop_text = llm.tokenizer.decode(base[1].token_ids[:3])
    out = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12, stop=[stop_text]) if stop_text else None)
    assert out[1].finish_reason == "stop" and len(out[1].token_ids) <= 3
    assert [o.token_ids for i, o in enumerate(out) if i != 1] == [o.token_ids for i, o in enumerate(base) if i != 1]
    assert eos not in out[1].token_ids


def test_ar_equals_the_uncached_reference(llm):
    from reference import ar_greedy

    for prompt in PROMPTS:
        out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))[0]
        assert out.token_ids == ar_greedy(llm.model, llm.tokenizer.encode(prompt), 20)


@pytest.mark.parametrize("block_length", [4, 8])
def test_selfspec_equals_the_uncached_reference_in_tokens_and_cycles(llm, block_length):
    """selfspec == AR greedy holds even with garbage drafts; this pins the drafts themselves: the
    tokens per cycle equal a reference that drafts with a full forward with the LoRA on."""
    from reference import selfspec_greedy

    cycles_seen = set()
    for prompt in PROMPTS:
        out = llm.generate(
            prompt,
            SamplingParams(temperature=0.0, mode="selfspec", max_tokens=30, block_length=block_length, ignore_eos=True),
        )[0]
        tokens, cycles = selfspec_greedy(llm.model, llm.tokenizer.encode(prompt), 30, block_length, MASK_ID)
        assert out.token_ids == tokens
        assert out.mode_stats["tokens_per_cycle"] == cycles
        cycles_seen |= set(cycles)
    assert 1 in cycles_seen and max(cycles_seen) > 1  # drafts rejected and accepted


def test_a_diffusion_row_that_ends_early_does_not_end_its_neighbours(llm):
    """NVIDIA's reference stops denoising the whole batch's block when one row reveals EOS; here the
    row that reveals EOS early finishes, and its neighbours decode exactly as they do alone."""
    params = SamplingParams(temperature=0.0, mode="diffusion", max_tokens=32, block_length=8, threshold=0.0)
    base = llm.generate(
        PROMPTS[0],
        SamplingParams(
            temperature=0.0, mode="diffusion", max_tokens=32, block_length=8, threshold=0.0, ignore_eos=True
        ),
    )[0]
    others = llm.generate(PROMPTS[1:], params)
    eos = next(t for t in base.token_ids[2:6] if all(t not in o.token_ids for o in others))
    llm.eos_token_ids.add(eos)
    try:
        alone = [llm.generate(p, params)[0] for p in PROMPTS]
        batched = llm.generate(PROMPTS, params)
    finally:
        llm.eos_token_ids.discard(eos)
    assert batched[0].finish_reason == "stop" and len(batched[0].token_ids) < 8
    assert all(len(o.token_ids) == 32 for o in batched[1:])
    for a, b in zip(alone, batched):
        assert a.token_ids == b.token_ids and a.num_forwards == b.num_forwards


@pytest.mark.parametrize("block_length", [2, 4, 8, 16])
def test_quadratic_selfspec_equals_ar_and_the_uncached_reference(llm, block_length):
    """Quadratic self-spec, batched (rows of different lengths; one row's budget ends mid-pass),
    gives AR greedy's tokens, and the tokens per cycle of a reference that rebuilds the whole
    b(b+1)-token pass from loops, uncached; a request costs its prefill and one forward per cycle."""
    from reference import quadratic_greedy

    budgets = [30, 30, 13, 30]
    params = [
        SamplingParams(
            temperature=0.0, mode="selfspec", spec="quadratic", block_length=block_length, max_tokens=n, ignore_eos=True
        )
        for n in budgets
    ]
    out = llm.generate(PROMPTS, params)
    ar = llm.generate(PROMPTS, [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in budgets])
    assert ids(out) == ids(ar)
    cycles_seen = set()
    for prompt, n, o in zip(PROMPTS, budgets, out):
        tokens, cycles = quadratic_greedy(llm.model, llm.tokenizer.encode(prompt), n, block_length, MASK_ID)
        assert o.token_ids == tokens and o.mode_stats["tokens_per_cycle"] == cycles
        assert o.num_forwards == 1 + len(cycles)
        cycles_seen |= set(cycles)
    assert max(cycles_seen) > 1  # drafts accepted, so the commit-and-continue path ran


def test_quadratic_leaves_the_kv_pool_as_ar_does(llm):
    """After a quadratic request the pool caches the same pages as after AR's, holding the same K/V
    (the chain's are AR's pass; the masks' slots were scratch), and a follow-up that shares its
    prefix hits them and decodes as it does alone."""
    prompt = llm.tokenizer.encode(PROMPTS[2])
    pools = []
    for params in (dict(), dict(mode="selfspec", spec="quadratic", block_length=8)):
        engine = llm.engine(kv_cache_tokens=2048)
        engine.add_tokenized("first", prompt, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, **params))
        outs = [o.output for _ in range(200) for o in engine.step() if o.output is not None]
        context = prompt + outs[0].token_ids + [5, 6, 7]
        pages = engine.pool.match_prefix(context)
        pools.append((engine, context, pages))
    (ar, _, ar_pages), (quadratic, context, pages) = pools
    assert len(pages) == len(ar_pages) >= (len(prompt) + 38) // 16  # all but the last, uncommitted token's page
    slots = torch.tensor([p * 16 + i for p in pages for i in range(16)])
    ar_slots = torch.tensor([p * 16 + i for p in ar_pages for i in range(16)])
    for layer in range(len(ar.pool.k)):
        torch.testing.assert_close(quadratic.pool.k[layer][slots], ar.pool.k[layer][ar_slots])
        torch.testing.assert_close(quadratic.pool.v[layer][slots], ar.pool.v[layer][ar_slots])
    quadratic.pool.release(pages)
    hits = quadratic.pool.num_prefix_hits
    quadratic.add_tokenized("follow-up", context, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    follow = [o.output for _ in range(50) for o in quadratic.step() if o.output is not None][0]
    assert quadratic.pool.num_prefix_hits - hits == 16 * len(pages)
    assert (
        follow.token_ids
        == llm.generate([context], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0].token_ids
    )


def test_quadratic_after_a_chunked_prefill_starts_blind(llm):
    """A prompt fed in chunks carries no drafting masks: the row's first pass drafts (its chain
    holds masks, none accepted), then cycles go on as the reference's `blind` start has them."""
    from reference import quadratic_greedy

    settled = llm.generate(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[
        0
    ]  # a repeat drafts foresee
    prompt = settled.prompt_token_ids + settled.token_ids
    params = SamplingParams(
        temperature=0.0, mode="selfspec", spec="quadratic", block_length=4, max_tokens=30, ignore_eos=True
    )
    engine = llm.engine(max_num_batched_tokens=20)
    assert len(prompt) > 20
    engine.add_tokenized("r", prompt, params)
    out = [o.output for _ in range(200) for o in engine.step() if o.output is not None][0]
    tokens, cycles = quadratic_greedy(llm.model, prompt, 30, 4, MASK_ID, blind=True)
    assert out.token_ids == tokens and out.mode_stats["tokens_per_cycle"] == cycles
    assert out.num_forwards == 2 + len(cycles)  # two chunks, then one per cycle
    fused, fused_cycles = quadratic_greedy(llm.model, prompt, 30, 4, MASK_ID)
    assert fused == tokens and cycles[0] == 1 < max(cycles) and fused_cycles[0] > 1
