"""Chunked prefill: a long prompt is fed a chunk per prefill step, so it never stalls other requests,
decodes as if prefilled at once, and can be aborted between chunks."""

from __future__ import annotations

import resource

import pytest

from trimode import LLM, SamplingParams
from trimode.tasks import TASKS, held_out


@pytest.fixture(scope="module")
def embedded():
    return LLM()


def long_prompt(llm: LLM, tokens: int) -> list[int]:
    """`tokens` ids of real text (the standard library), so the model has something to continue."""
    import inspect
    import json

    ids = llm.tokenizer.encode(inspect.getsource(json.decoder) * 50)
    assert len(ids) >= tokens
    return ids[:tokens]


def run(engine, jobs):
    """Add every job at once, step to completion; returns ({id: output}, {id: step of first token})."""
    for rid, prompt, params in jobs:
        engine.add_request(rid, prompt, params)
    results, first, step = {}, {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.error is None
            if out.new_token_ids:
                first.setdefault(out.request_id, step)
            if out.finished:
                results[out.request_id] = out.output
        step += 1
    return results, first


@pytest.mark.parametrize("mode", ["ar", "diffusion", "selfspec", "quadratic"])
def test_a_chunked_prefill_decodes_as_a_whole_one(embedded, mode):
    prompt = long_prompt(embedded, 300)
    kind = dict(mode="selfspec", spec="quadratic", block_length=4) if mode == "quadratic" else dict(mode=mode)
    params = SamplingParams(**kind, temperature=0.0, max_tokens=24)
    whole, _ = run(embedded.engine(max_num_batched_tokens=4096), [("r", prompt, params)])
    chunked, _ = run(embedded.engine(max_num_batched_tokens=64), [("r", prompt, params)])
    assert chunked["r"].token_ids == whole["r"].token_ids
    # 300 prompt tokens in chunks of 64 are 5 forwards where the whole prefill is 1: every forward counts.
    # Quadratic self-spec drafts its first block in a whole prefill; after chunks its first pass does.
    extra = chunked["r"].num_forwards - whole["r"].num_forwards
    assert extra == 4 if mode != "quadratic" else 4 <= extra <= 5


def test_a_long_newcomer_does_not_delay_short_ones_admitted_with_it(embedded):
    """Pins: newcomers admitted together were prefilled as one padded batch, so 31 short requests
    beside one 1,500-token prompt waited for all of it. Here the long prompt (1,500 tokens, chunks
    of 128) arrives first; prefill steps alternate between its chunks and the newcomers (as many as
    fit in 128 prompt tokens, ~3 chats), so the 8 short requests all have their first token by step
    12, while the long prompt's prefill (12 chunks, taking turns with the newcomers, then with the
    short requests' decode) ends well after that, past step 20."""
    shorts = [e.messages() for t in TASKS for e in held_out(t, 2)][:8]
    jobs = [("long", long_prompt(embedded, 1500), SamplingParams(temperature=0.0, max_tokens=4))]
    jobs += [
        (f"s{i}", m, SamplingParams(temperature=0.0, mode="selfspec", max_tokens=16)) for i, m in enumerate(shorts)
    ]
    results, first = run(embedded.engine(max_num_batched_tokens=128), jobs)
    assert first["long"] >= 20
    assert max(first[f"s{i}"] for i in range(len(shorts))) <= 12
    for i, m in enumerate(shorts):
        assert (
            results[f"s{i}"].token_ids
            == embedded.chat(m, SamplingParams(temperature=0.0, mode="selfspec", max_tokens=16))[0].token_ids
        )


def test_aborting_a_prompt_mid_prefill_frees_its_cache(embedded):
    engine = embedded.engine(max_num_batched_tokens=64)
    engine.add_request("long", long_prompt(embedded, 1000), SamplingParams(temperature=0.0, max_tokens=8))
    engine.add_request("short", "def f(x):", SamplingParams(temperature=0.0, max_tokens=8))
    while not any(out.finished for out in engine.step()):  # until "short" is done
        pass
    # "long", some chunks of 64 in, holds the pages of those chunks, not of its whole prompt
    fed = engine._chunked[0].batch.kv.lengths[0]
    assert engine.num_running == 1 and 0 < fed < 1000 and engine.num_kv_slots_allocated == fed
    assert engine.abort_request("long")
    assert engine.num_running == 0 and engine.num_kv_slots_allocated == 0
    assert engine.pool.num_free_pages == engine.pool.num_pages
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.num_kv_slots_allocated == 0


@pytest.mark.slow
def test_a_32k_token_prompt_completes_in_bounded_memory_while_short_requests_flow(embedded):
    """32,768 prompt tokens in chunks of 512: the peak RSS stays bounded (a one-shot prefill builds
    32k x 32k masks and attention weights, tens of GB), and short requests sent during the prefill
    get their first token within a few steps."""
    engine = embedded.engine(max_num_batched_tokens=512)
    engine.add_request("long", long_prompt(embedded, 32768), SamplingParams(temperature=0.0, max_tokens=8))
    sent, first, step = {}, {}, 0
    while engine.has_unfinished_requests():
        if step % 10 == 0 and len(sent) < 5:
            sent[f"s{len(sent)}"] = step
            engine.add_request(f"s{len(sent) - 1}", "def f(x):", SamplingParams(temperature=0.0, max_tokens=4))
        for out in engine.step():
            if out.new_token_ids:
                first.setdefault(out.request_id, step)
        step += 1
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"peak RSS {peak_gb:.2f} GB after a 32k-token prompt; steps to a short request's first token: "
        f"{[first[r] - sent[r] for r in sent]}; the long one's at step {first['long']}"
    )
    assert peak_gb < 6
    assert first["long"] > 64  # 64 chunks
    assert max(first[r] - sent[r] for r in sent) <= 4  # a chunk, a decode step, its own prefill


def test_a_slow_converging_diffusion_request_does_not_stall_other_streams(embedded):
    """Pins: one diffusion request with block 256 and threshold 1.0 ran 255 passes inside one engine
    step, stalling every other stream. A decode step is now one forward of one group: an AR request
    beside it gets a token on most steps and finishes while the diffusion block is still denoised."""
    engine = embedded.engine()
    engine.add_request(
        "slow",
        "def f(x):",
        SamplingParams(
            temperature=0.0, mode="diffusion", block_length=256, threshold=1.0, max_tokens=255, ignore_eos=True
        ),
    )
    engine.add_request("ar", "import os\n", SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    steps, done = 0, {}
    while "ar" not in done:
        for out in engine.step():
            if out.finished:
                done[out.request_id] = steps
        steps += 1
    # Decode steps go to the group with the least forward time per row: mostly the AR one here, the
    # diffusion group's 256-token pass now and then. Before, the first decode step ran all 255 passes.
    assert "slow" not in done and done["ar"] <= 34
    assert engine.num_running == 1
