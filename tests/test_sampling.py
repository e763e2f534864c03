"""Sampling: seeds, top-k/top-p, and self-spec rejection sampling that keeps the AR distribution."""

from __future__ import annotations

import collections

import pytest
import torch
from conftest import PROMPTS
from reference import full_forward

from trimode import SamplingParams
from trimode.sampler import Sampler


@pytest.mark.parametrize("mode", ["ar", "diffusion", "selfspec"])
def test_same_seed_same_output_different_seed_different_output(llm, mode):
    def run(seed):
        params = SamplingParams(
            mode=mode, temperature=1.0, top_p=0.95, seed=seed, max_tokens=24, block_length=8, ignore_eos=True
        )
        return [o.token_ids for o in llm.generate(PROMPTS, params)]

    assert run(7) == run(7)
    assert run(7) != run(8)


@pytest.mark.parametrize("mode", ["ar", "diffusion", "selfspec"])
def test_top_k_one_is_greedy(llm, mode):
    greedy = llm.generate(
        PROMPTS, SamplingParams(temperature=0.0, mode=mode, max_tokens=16, block_length=8, ignore_eos=True)
    )
    sampled = llm.generate(
        PROMPTS,
        SamplingParams(mode=mode, temperature=2.0, top_k=1, seed=3, max_tokens=16, block_length=8, ignore_eos=True),
    )
    assert [o.token_ids for o in greedy] == [o.token_ids for o in sampled]


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]]))
    p = Sampler.of([SamplingParams(temperature=1.0, top_k=3, top_p=0.7)], torch.device("cpu")).probs(logits)
    assert torch.allclose(p, torch.tensor([[[0.625, 0.375, 0.0, 0.0]]]))  # top-3, then the 0.7 nucleus
    p = Sampler.of([SamplingParams(temperature=1.0, top_k=3)], torch.device("cpu")).probs(logits)
    assert torch.allclose(p, torch.tensor([[[0.5, 0.3, 0.15, 0.0]]]) / 0.95)
    g = Sampler.of([SamplingParams(temperature=0.0)], torch.device("cpu")).probs(logits)
    assert g.tolist() == [[[1.0, 0.0, 0.0, 0.0]]]


def test_inverse_cdf_sampling_matches_the_distribution():
    sampler = Sampler.of([SamplingParams(temperature=1.0, seed=0)], torch.device("cpu"))
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    draws = sampler.sample(probs.expand(1, 20000, 4))[0]
    freq = torch.bincount(draws, minlength=4).float() / 20000
    assert freq[1] == 0 and (freq - probs).abs().max() < 0.015


def total_variation(outs, exact: dict[tuple, float]) -> float:
    """Between the sampled sequences' frequencies and the exact joint (`exact_joint`), which must
    allow every sequence sampled."""
    counts = collections.Counter(tuple(o.token_ids) for o in outs)
    assert set(counts) <= set(exact), set(counts) - set(exact)
    return 0.5 * sum(abs(counts.get(k, 0) / len(outs) - p) for k, p in exact.items())


def exact_joint(llm, prompt_ids, params, length, penalised=False):
    """P(t1..t_length) under the AR model with `params`' temperature/top-k/top-p (and with
    `penalised`, its presence penalty on the tokens generated before each position), by tree
    expansion."""
    sampler = Sampler.of([params], torch.device("cpu"))
    dist = {(): 1.0}
    for _ in range(length):
        grown = {}
        for seq, prob in dist.items():
            logits = full_forward(llm.model, list(prompt_ids) + list(seq))[-1]
            if penalised and seq:
                logits = logits.clone()
                logits[list(set(seq))] -= params.presence_penalty
            p = sampler.probs(logits[None, None])[0, 0]
            for t in torch.nonzero(p).flatten().tolist():
                grown[seq + (t,)] = prob * p[t].item()
        dist = grown
    return dist


# Block 2 runs the same self-spec code as block 4 (slow: the default suite's time is bounded).
@pytest.mark.parametrize(
    "mode,block_length,spec",
    [
        ("ar", 4, "linear"),
        ("selfspec", 4, "linear"),
        ("selfspec", 4, "quadratic"),
        pytest.param("selfspec", 2, "linear", marks=pytest.mark.slow),
    ],
)
def test_sampled_sequences_follow_the_ar_distribution(llm, mode, block_length, spec):
    """Self-spec at temperature > 0 must sample exactly from the AR distribution (rejection sampling).

    Block 4 with 3 tokens: the budget cuts accepted runs (pins a bug where the cut emitted a fresh
    sample instead of the accepted draft). Block 2: runs of all-accepted drafts end in a bonus from p.
    Quadratic: its first pass accepts no draft and samples from p; its drafts come from the group
    of the accepted length, drawn before the bonus token is known."""
    # Continue a greedy run that has settled into the repeat the fixture's drafts can predict, so both
    # accepted and rejected drafts occur.
    settled = llm.generate(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))[0]
    ids = settled.prompt_token_ids + settled.token_ids
    length, n = 3, 3000
    base = dict(temperature=1.5, top_k=2, max_tokens=length, ignore_eos=True)
    exact = exact_joint(llm, ids, SamplingParams(**base), length)
    outs = llm.generate(
        [ids] * n, [SamplingParams(mode=mode, block_length=block_length, spec=spec, seed=s, **base) for s in range(n)]
    )
    tv = total_variation(outs, exact)
    assert tv < 0.05, tv
    if mode == "selfspec":
        cycles = [c for o in outs for c in o.mode_stats["tokens_per_cycle"]]
        assert 1 in cycles and max(cycles) > 1  # both rejections and acceptances happened


def test_counter_based_streams_are_per_row_uniform_and_batch_independent():
    from trimode.sampler import RandomStream, Sampler, counter_uniform

    u = counter_uniform(torch.tensor([0, 1, -5, 2**62]), torch.tensor([0, 0, 3, 7]), 20000)
    assert 0 <= u.min() and u.max() < 1
    assert torch.allclose(u.mean(1), torch.full((4,), 0.5), atol=0.01)
    assert torch.allclose(u.std(1), torch.full((4,), 12**-0.5), atol=0.01)
    assert not torch.equal(u[0], u[1])  # another seed, another stream
    # A row's numbers depend on its seed and draw count alone: alone, batched, or drawing while a
    # neighbour sits out (`rows`), the same; a row that sits out does not advance.
    params = [SamplingParams(temperature=1.0, seed=s) for s in (3, 2**64 - 1)]
    alone = Sampler.of(params[1:], torch.device("cpu"))
    batched = Sampler.of(params, torch.device("cpu"))
    first = batched.uniform(5, rows=[1])
    assert torch.equal(first[1], alone.uniform(5)[0]) and torch.equal(first[0], torch.full((5,), 0.5))
    assert [s.draws for s in batched.streams] == [0, 1]
    assert torch.equal(batched.uniform(5)[1], alone.uniform(5)[0])
    assert batched.streams[1] == RandomStream(2**64 - 1, 2)
