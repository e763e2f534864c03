"""Log-probabilities in every mode against slow references (tests/reference.py), and prompt
logprobs against one plain causal forward: batched prompts of different lengths, a chunked
prefill, a prompt whose prefix is cached. Diffusion's are checked in test_diffusion.py."""

from __future__ import annotations

import pytest
from conftest import PROMPTS
from reference import full_forward

from trimode import SamplingParams
from trimode.sampling_params import MAX_LOGPROBS


def chosen(out) -> list[float]:
    return [p[t].logprob for p, t in zip(out.logprobs, out.token_ids)]


def causal_logprobs(llm, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1, from one forward with no cache."""
    lp = full_forward(llm.model, ids).log_softmax(-1)
    return [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]


def test_ar_logprobs_are_the_models_and_selfspec_reports_the_same(llm):
    """AR: each token's log-probability under the causal forward of everything before it, its rank
    and the top k in order. Self-spec at temperature 0 reports the verifier's: the same numbers."""
    params = dict(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=3)
    ar = llm.generate(PROMPTS[:3], SamplingParams(mode="ar", **params))
    spec = llm.generate(PROMPTS[:3], SamplingParams(mode="selfspec", block_length=4, **params))
    quadratic = llm.generate(PROMPTS[:3], SamplingParams(mode="selfspec", spec="quadratic", block_length=4, **params))
    for a, s, q in zip(ar, spec, quadratic):
        assert a.token_ids == s.token_ids == q.token_ids and len(a.logprobs) == len(a.token_ids)
        want = causal_logprobs(llm, a.prompt_token_ids + a.token_ids)[len(a.prompt_token_ids) - 1 :]
        assert chosen(a) == pytest.approx(want, abs=1e-4) and chosen(s) == pytest.approx(want, abs=1e-4)
        assert chosen(q) == pytest.approx(want, abs=1e-4)
        for position, token in zip(a.logprobs, a.token_ids):
            (first, *top) = position.items()
            assert first[0] == token and first[1].rank == 1  # greedy: the most likely token
            values = [lp.logprob for _, lp in top]
            assert 2 <= len(top) <= 3 and values == sorted(values, reverse=True)
    assert a.outputs[0].logprobs == a.logprobs


def test_sampled_tokens_have_their_rank_and_stop_strings_cut_logprobs_too(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=24, temperature=1.5, seed=3, logprobs=0))[0]
    ranks = [p[t].rank for p, t in zip(out.logprobs, out.token_ids)]
    assert len(ranks) == len(out.token_ids) and max(ranks) > 1  # sampled: not always the argmax
    assert all(len(p) == 1 for p in out.logprobs)  # logprobs=0: the chosen token only
    text = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0].text
    cut = llm.generate(
        PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=text[3:6], logprobs=1)
    )[0]
    assert cut.finish_reason == "stop" and len(cut.logprobs) == len(cut.token_ids) < 12


def test_prompt_logprobs_equal_one_causal_forward(llm):
    """Prompts of different lengths prefilled together (right-padded), with max_tokens 0: each
    prompt token's log-probability given the tokens before it, the first None."""
    params = SamplingParams(temperature=0.0, max_tokens=0, prompt_logprobs=MAX_LOGPROBS)
    for out in llm.generate(PROMPTS, params):
        ids = out.prompt_token_ids
        assert out.token_ids == [] and out.finish_reason == "length"
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
        got = [p[t].logprob for p, t in zip(out.prompt_logprobs[1:], ids[1:])]
        assert got == pytest.approx(causal_logprobs(llm, ids), abs=1e-4)
        assert all(len(p) >= MAX_LOGPROBS for p in out.prompt_logprobs[1:])


def test_prompt_logprobs_through_chunks_and_past_a_cached_prefix(llm):
    """A prompt longer than the token budget is prefilled in chunks, each scoring its positions; a
    prompt whose pages another request cached is still fed, and scored, whole."""
    prompt = PROMPTS[2] * 6
    ids = llm.tokenizer.encode(prompt)
    want = causal_logprobs(llm, ids)
    engine = llm.engine(max_batch=4, kv_cache_tokens=4096, max_num_batched_tokens=16)
    engine.add_request("warm", prompt, SamplingParams(temperature=0.0, max_tokens=2))  # caches the prompt's pages
    engine.add_request("scored", prompt, SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=0, logprobs=0))
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.output is not None:
                results[out.request_id] = out.output
    scored = results["scored"]
    assert len(ids) > 16 and [p[t].logprob for p, t in zip(scored.prompt_logprobs[1:], ids[1:])] == pytest.approx(
        want, abs=1e-4
    )
    assert scored.token_ids == results["warm"].token_ids[:2] + scored.token_ids[2:] and len(scored.logprobs) == 3
