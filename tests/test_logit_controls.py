"""Logit controls (trimode/logit_controls.py) and n samples, in every mode: self-spec emits what AR
would under every control at temperature 0 (each verify position sees the drafts before it), and
samples from AR's distribution at temperature > 0; each control does what it says."""

from __future__ import annotations

import pytest
from conftest import PROMPTS
from test_sampling import exact_joint, total_variation

from trimode import SamplingParams

CONTROLS = [
    {"presence_penalty": 1.5},
    {"frequency_penalty": 0.7},
    {"repetition_penalty": 1.8},
    {"presence_penalty": -0.5, "repetition_penalty": 1.3, "logit_bias": {5: 8.0}},
]


def tokens(llm, prompts, params) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, params)]


@pytest.mark.parametrize("block_length,spec", [(4, "linear"), (8, "linear"), (4, "quadratic")])
def test_selfspec_equals_ar_under_every_control(llm, block_length, spec):
    """Rows with different controls in one batch; with the draft LoRA, drafts do get accepted."""
    params = [
        SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, block_length=block_length, **c)
        for c in CONTROLS
    ]
    ar = tokens(llm, PROMPTS, params)
    spec = [SamplingParams(**{**vars(p), "mode": "selfspec", "spec": spec}) for p in params]
    assert tokens(llm, PROMPTS, spec) == ar
    assert ar != tokens(
        llm, PROMPTS, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    )  # the controls changed it


def test_each_control_does_what_it_says(llm):
    """The random test model falls into repeating a token: penalties break the repeat (more
    distinct tokens, in every mode), a -100 bias bans a token, min_tokens holds off a stop token."""
    base = dict(temperature=0.0, max_tokens=24, ignore_eos=True, block_length=4)
    for mode in ("ar", "diffusion", "selfspec"):
        plain = tokens(llm, PROMPTS[:2], SamplingParams(mode=mode, **base))
        for control in CONTROLS[:3]:
            penalised = tokens(llm, PROMPTS[:2], SamplingParams(mode=mode, **base, **control))
            assert all(len(set(p)) > len(set(q)) for p, q in zip(penalised, plain)), (mode, control)
        first = plain[0][0]
        banned = tokens(llm, PROMPTS[:1], SamplingParams(mode=mode, **base, logit_bias={first: -100.0}))[0]
        assert first not in banned
        stop = SamplingParams(mode=mode, **{**base, "ignore_eos": False}, stop_token_ids=[first])
        assert llm.generate(PROMPTS[0], stop)[0].token_ids == [first]
        held = llm.generate(PROMPTS[0], SamplingParams(**{**vars(stop), "min_tokens": 6}))[0].token_ids
        assert len(held) > 6 and first not in held[:6]


@pytest.mark.slow  # 2,000 samples: some 6 s
def test_selfspec_samples_the_ar_distribution_under_penalties(llm):
    """At temperature > 0 the emitted sequences follow AR's penalised distribution (total variation
    against the exact joint, by tree expansion with the penalties applied per prefix)."""
    settled = llm.generate(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))[0]
    ids = settled.prompt_token_ids + settled.token_ids
    base = dict(temperature=1.5, top_k=3, max_tokens=3, ignore_eos=True, presence_penalty=1.0)
    exact = exact_joint(llm, ids, SamplingParams(**base), 3, penalised=True)
    n = 2000
    outs = llm.generate([ids] * n, [SamplingParams(mode="selfspec", block_length=4, seed=s, **base) for s in range(n)])
    tv = total_variation(outs, exact)
    assert tv < 0.06, tv


def test_n_samples_share_the_prompt_and_equal_seeded_singles(llm):
    prompt = PROMPTS[2] * 3
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=6, ignore_eos=True)
    (out,) = llm.generate(prompt, params)
    singles = [tokens(llm, [prompt], p)[0] for p in params.samples()]
    assert [c.token_ids for c in out.outputs] == singles and len({tuple(s) for s in singles}) == 3
    assert [c.index for c in out.outputs] == [0, 1, 2] and out.token_ids == singles[0]
    engine = llm.engine(max_batch=8, kv_cache_tokens=4096)
    for j, sample in enumerate(params.samples()):
        engine.add_request(str(j), prompt, sample, parent_id="n")  # samples of one request share its pages
    while engine.has_unfinished_requests():
        engine.step()
    full_pages = len(llm.tokenizer.encode(prompt)) // 16
    assert full_pages and engine.pool.num_prefix_hits == 2 * full_pages * 16  # the 2nd and 3rd reused the 1st's
