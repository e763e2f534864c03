"""Fair admission between client requests (issue 24, item 8): the n samples of one request take
turns with other requests for rows and queue places, and each sample still gives what it gives
alone."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from live import in_process, run_client

from trimode import SamplingParams
from trimode.config import EngineConfig
from trimode.engine.request import Request
from trimode.engine.scheduler import QueueFull, Scheduler

BIG = "def fib(n):"
SHORT = "x ="


def request(request_id: str, parent: str, prompt: list[int], max_tokens: int = 8) -> Request:
    return Request(
        None, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens), request_id=request_id, parent_id=parent
    )


def scheduler(max_batch: int = 4, max_queue: int = 8) -> Scheduler:
    return Scheduler(EngineConfig(max_batch, max_queue, kv_cache_tokens=4096, page_size=16))


def test_the_samples_of_one_request_take_turns_with_other_requests():
    """Pins: admission was first come, first served over samples: a 4-token request behind the
    samples of an n = 8 request waited for all of them to be admitted (and, with the rows full,
    to finish)."""
    s = scheduler()
    big = [request(f"big-{j}", "big", [1, 2, 3]) for j in range(8)]
    for r in big:
        s.add(r)
    short = request("short", "short", [4, 5])
    s.add(short)
    # big-1.. share big-0's context, so they wait for its prefill; the short request need not.
    assert s.admit([], 100) == [big[0], short]
    assert s.admit([big[0], short], 100) == big[1:3]  # then big's samples fill the free rows


def test_a_parent_holding_every_row_gives_one_up_to_a_waiting_request():
    s = scheduler()
    running = [request(f"big-{j}", "big", [1, 2, 3]) for j in range(4)]
    for j, r in enumerate(running):
        r.token_ids = [7] * (10 - j)  # the last has the least output to recompute
    short = request("short", "short", [4, 5])
    s.add(short)
    assert s.to_preempt(running) == [running[-1]]
    s.add_preempted(running[-1])
    assert s.admit(running[:3], 100) == [short]  # it goes before the sample it displaced
    # Requests holding one row each are served first come, first served: nobody is preempted.
    singles = [request(f"r{j}", f"r{j}", [1, 2]) for j in range(4)]
    s = scheduler()
    s.add(request("late", "late", [3]))
    assert s.to_preempt(singles) == []
    # Two rows against none: one moves; two against one: none (it would only move the imbalance).
    pairs = [request(f"{p}-{j}", p, [1, 2]) for p in ("a", "b") for j in range(2)]
    assert len(s.to_preempt(pairs)) == 1
    assert s.to_preempt([*pairs[:3], s.admit(pairs[:3], 100)[0]]) == []


def test_queue_places_count_client_requests_not_samples():
    """Pins: each of an n request's waiting samples took a queue place, so one request could fill
    the queue and have every other client refused."""
    s = scheduler(max_batch=1, max_queue=2)
    for j in range(16):
        s.add(request(f"big-{j}", "big", [1, 2]))
    s.add(request("other", "other", [3]))
    with pytest.raises(QueueFull):
        s.add(request("third", "third", [4]))
    assert s.num_places == 2 and len(s.waiting) == 17
    s.remove("other")
    s.add(request("third", "third", [4]))


@pytest.mark.parametrize("prompt", [SHORT, BIG], ids=["its-own-prompt", "the-same-prompt"])
def test_a_short_request_finishes_while_a_large_n_request_runs(llm, prompt):
    """Pins the head-of-line block end to end in the engine: with every row taken by the samples of
    an n = 8 request, a 4-token request waited for a whole wave of them to finish. It now gets a row
    at the next prefill (a sample gives its row up and resumes later), and every sample gives the
    tokens and logprobs it gives without any neighbour. With the same prompt as the samples, it
    waited for them anyway (it queued behind a waiting sample to share its pages)."""
    big = SamplingParams(max_tokens=48, temperature=1.0, seed=11, logprobs=3, ignore_eos=True, n=8)
    short = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    engine = llm.engine(max_batch=4)
    ids = llm.tokenizer.encode(BIG)
    for j, sample in enumerate(big.samples()):
        engine.add_tokenized(f"big-{j}", ids, sample, parent_id="big")
    for _ in range(6):
        engine.step()
    engine.add_tokenized("short", llm.tokenizer.encode(prompt), short)
    finished: list[str] = []
    outputs = {}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.error is None, out.error
            if out.finished:
                finished.append(out.request_id)
                outputs[out.request_id] = out.output
        steps += 1
        if "short" in finished and steps < 8:
            assert not [r for r in finished if r != "short"], "a sample finished before the short request"
    assert finished.index("short") == 0
    assert engine.num_preemptions >= 1
    for j, alone in enumerate(llm.generate(BIG, big)[0].outputs):  # offline: every sample has a row throughout
        got = outputs[f"big-{j}"].outputs[0]
        assert got.token_ids == alone.token_ids
        for position, expected in zip(got.logprobs, alone.logprobs, strict=True):
            assert list(position) == list(expected)
            assert [e.logprob for e in position.values()] == pytest.approx([e.logprob for e in expected.values()])
    assert outputs["short"].token_ids == llm.generate(prompt, short)[0].token_ids


def test_the_server_admits_a_short_request_beside_a_large_n_request(llm):
    """The same through the HTTP API, where a request's samples share its id as their parent: with
    max_queue 2, the n = 8 request's waiting samples take one queue place (they took all, and it was
    refused), and the short request is answered while all 8 samples still run or wait."""
    body = {"model": "tiny", "prompt": BIG, "n": 8, "max_tokens": 200, "ignore_eos": True}

    async def go(c: httpx.AsyncClient) -> tuple[httpx.Response, int, httpx.Response]:
        big = asyncio.ensure_future(c.post("/v1/completions", json=body))
        while engine.status.running < 4:  # every row taken by its samples
            assert not big.done(), big.result().text
            await asyncio.sleep(0.01)
        short = await c.post("/v1/completions", json={"model": "tiny", "prompt": SHORT, "max_tokens": 4})
        await asyncio.sleep(0.05)  # the engine's next snapshot
        unfinished = engine.status.running + engine.status.waiting
        return short, unfinished, await big

    with in_process(llm.engine(max_batch=4, max_queue=2), "tiny") as (engine, app):
        short, unfinished, big = run_client(app, go, timeout=120)
    assert short.status_code == 200, short.text
    assert unfinished == 8
    assert big.status_code == 200 and [len(c["text"]) > 0 for c in big.json()["choices"]] == [True] * 8
