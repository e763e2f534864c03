"""The engine over one paged KV pool: pages always balance, preemption and prefix caching never
change what a request decodes, and a budget holds what its requests use, not their worst case."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from trimode import LLM, SamplingParams
from trimode.engine.request import Request
from trimode.engine.scheduler import kv_slots
from trimode.tasks import TASKS, held_out

MODES = [("ar", 32), ("diffusion", 8), ("selfspec", 8)]


@pytest.fixture(scope="module")
def embedded():
    return LLM()


def check_pages(engine) -> None:
    """Every referenced page is held by exactly its readers; the rest are free or cached, once."""
    pool = engine.pool
    held = Counter(
        p
        for b in [g.batch for g in engine.groups.values()] + [c.batch for c in engine._chunked]
        for row in b.kv.pages
        for p in row
    )
    assert [pool.refs[p] for p in range(pool.num_pages)] == [held.get(p, 0) for p in range(pool.num_pages)]
    idle = list(pool.free) + list(pool.evictable)
    assert len(idle) == len(set(idle)) == pool.num_free_pages
    assert not set(idle) & set(held) and len(held) + len(idle) == pool.num_pages


def drive(engine, jobs, rng=None, abort_rate=0.0, per_step=1):
    """Add `jobs`, `per_step` a step; abort running ones at random; check the pages after every step."""
    results, pending, aborted = {}, list(jobs), set()
    while pending or engine.has_unfinished_requests():
        for _ in range(min(per_step, len(pending))):
            engine.add_request(*pending.pop(0))
        if rng is not None and rng.random() < abort_rate and engine.running():
            victim = rng.choice(engine.running()).request_id
            assert engine.abort_request(victim)
            aborted.add(victim)
        for out in engine.step():
            assert out.error is None, out.error
            if out.finished:
                results[out.request_id] = out.output
        check_pages(engine)
    return results, aborted


@pytest.mark.parametrize("num_requests", [150, pytest.param(3000, marks=pytest.mark.slow)])
def test_pages_balance_through_mixed_requests_aborts_and_preemptions(llm, num_requests):
    """Pins the invariant of the pool: after hundreds (thousands, in the slow run) of requests of
    every mode in a pool too small for them all (preempting), with aborts at random, every page is
    back and nothing leaked."""
    rng = random.Random(num_requests)
    jobs = []
    for i in range(num_requests):
        mode, block = MODES[i % 3][0], 8
        prompt = [rng.randrange(5, 400) for _ in range(rng.randrange(3, 40))]
        params = SamplingParams(
            temperature=0.0, mode=mode, block_length=block, max_tokens=rng.randrange(1, 40), ignore_eos=i % 2 == 0
        )
        jobs.append((f"r{i}", prompt, params))
    engine = llm.engine(max_batch=12, max_queue=num_requests, kv_cache_tokens=24 * 4, page_size=4)
    results, aborted = drive(engine, jobs, rng, abort_rate=0.05, per_step=3)
    assert engine.num_preemptions >= 5 and aborted  # ~10-27 for 150-240 requests (pacing follows the clock)
    assert set(results) | aborted == {j[0] for j in jobs}
    assert engine.pool.refs == [0] * engine.pool.num_pages
    assert engine.pool.num_free_pages == engine.pool.num_pages


@pytest.mark.parametrize("mode,block", MODES)
def test_a_preempted_request_decodes_as_it_would_uninterrupted(llm, mode, block):
    """Four requests whose outputs outgrow a 10-page pool: the newest are preempted and resume by
    recomputing prompt + output; each still decodes exactly its solo greedy tokens."""
    params = SamplingParams(temperature=0.0, mode=mode, block_length=block, max_tokens=40, ignore_eos=True)
    jobs = [(f"r{i}", [7 + i, 30, 41 + i, 12, 99, 5, 64 + i, 3, 18, 77], params) for i in range(4)]
    engine = llm.engine(max_batch=4, kv_cache_tokens=10 * 16, page_size=16)
    results, _ = drive(engine, jobs)
    assert engine.num_preemptions > 0
    for rid, prompt, p in jobs:
        assert results[rid].token_ids == llm.generate(prompt, p)[0].token_ids, rid


@pytest.mark.parametrize("mode,block", MODES)
def test_a_preempted_seeded_request_samples_as_it_would_uninterrupted(llm, mode, block):
    """As above at temperature 0.8, each request with its own seed. A request preempted mid-block
    (a diffusion block half denoised, self-spec drafts not yet verified) had drawn random numbers
    for work it loses; it resumed past them and sampled other tokens than alone (the soak found
    seeded n = 2 diffusion samples differing once fair admission preempted them)."""
    jobs = [
        (
            f"r{i}",
            [9 + i, 30, 41, 12, 99, 5, 64, 3],
            SamplingParams(mode=mode, block_length=block, max_tokens=40, ignore_eos=True, temperature=0.8, seed=3 + i),
        )
        for i in range(4)
    ]
    engine = llm.engine(max_batch=4, kv_cache_tokens=10 * 16, page_size=16)
    results, _ = drive(engine, jobs)
    assert engine.num_preemptions > 0
    for rid, prompt, p in jobs:
        assert results[rid].token_ids == llm.generate(prompt, p)[0].token_ids, rid


@pytest.mark.parametrize("mode,block", MODES)
def test_prefix_cache_hits_decode_as_misses(embedded, mode, block):
    """Requests sharing a system turn reuse its pages (hits counted) and decode exactly as alone."""
    system = {"role": "system", "content": "You are a careful Python programmer. " * 6}
    chats = [[system, {"role": "user", "content": q}] for q in ("Sort 3 1 2.", "Reverse abc.", "Add 2 and 5.")]
    params = SamplingParams(temperature=0.0, mode=mode, block_length=block, max_tokens=16)
    engine = embedded.engine(kv_cache_tokens=4096)
    results, _ = drive(engine, [(f"c{i}", c, params) for i, c in enumerate(chats)])
    shared = len(embedded.tokenizer.encode_chat([system, {"role": "user", "content": ""}])) // 16 * 16
    assert shared >= 64 and engine.pool.num_prefix_hits >= 2 * (shared - 16)
    for i, chat in enumerate(chats):
        assert results[f"c{i}"].token_ids == embedded.chat(chat, params)[0].token_ids


def test_a_budget_holds_what_requests_use_not_their_worst_case(embedded):
    """16 chats asking for up to 512 tokens each in a 4,096-slot pool: a worst-case reservation
    (prompt + max_tokens + block) admits 7 at a time; pages admit all 16, since they end early
    (prefilled in one step, so none has finished before the last is admitted)."""
    chats = [e.messages() for t in TASKS for e in held_out(t, 4)][:16]
    params = SamplingParams(temperature=0.0, max_tokens=512)
    worst = [kv_slots(Request(None, embedded.tokenizer.encode_chat(c), params)) for c in chats]
    assert sum(worst[:8]) > 4096  # a worst-case reservation fits 7 at most
    engine = embedded.engine(max_batch=16, kv_cache_tokens=4096, max_num_batched_tokens=4096)
    for i, chat in enumerate(chats):
        engine.add_request(f"c{i}", chat, params)
    running = peak = 0
    while engine.has_unfinished_requests():
        engine.step()
        running = max(running, engine.num_running)
        peak = max(peak, engine.num_kv_slots_allocated)
    assert running == 16 and engine.num_preemptions == 0 and peak <= engine.pool.num_tokens


def test_a_follow_up_reuses_the_pages_of_a_finished_request_output_included(llm):
    """A finished request's prompt and output stay cached: a follow-up that starts with them (the
    next turn of a chat) prefills only what is new, and decodes as it would from scratch."""
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    prompt = [5 + i % 90 for i in range(40)]
    engine = llm.engine(kv_cache_tokens=1024, page_size=16)
    output = drive(engine, [("t1", prompt, params)])[0]["t1"].token_ids
    follow_up = prompt + output + [7, 8, 9]
    hits = engine.pool.num_prefix_hits
    got = drive(engine, [("t2", follow_up, params)])[0]["t2"]
    # Its KV held the prompt and all but the last output token (69 tokens): 4 full pages, 2 past the prompt.
    assert engine.pool.num_prefix_hits - hits == 64
    assert got.token_ids == llm.generate(follow_up, params)[0].token_ids
