"""CUDA graphs (engine/cuda_graphs.py) against the eager path, token for token.

On the CPU (default suite) a bucket's "capture" runs its static buffers eagerly, so every decode
pass goes through what a replay reads: the buckets, the padded rows and keys, the buffers, the
eager head after them. On a GPU (tests marked `gpu`, skipped without CUDA) the captured graphs
replay, in every mode, with and without the draft LoRA, at batch sizes inside and between buckets."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS

from trimode import LLM, SamplingParams
from trimode.engine.cuda_graphs import CudaGraphs, batch_bucket, span_bucket
from trimode.engine.model_runner import ModelRunner

# Every decoding shape: quadratic self-spec's pass carries per-token positions, its pattern as the
# mask and the draft LoRA per position through a bucket's buffers.
MODES = ("ar", "diffusion", "selfspec", "quadratic")


def _params(mode: str, **extra) -> SamplingParams:
    kind = dict(mode="selfspec", spec="quadratic") if mode == "quadratic" else dict(mode=mode)
    return SamplingParams(
        **{"temperature": 0.0, **kind, "max_tokens": 12, "block_length": 4, "ignore_eos": True, **extra}
    )


def _buffered_runner(model, capture=None) -> ModelRunner:
    """A CPU runner whose decode passes take the graph path, each bucket's buffers run eagerly."""
    runner = ModelRunner(model, compile=False)
    runner.graphs = CudaGraphs(model, capture=capture or (lambda static: static.run))
    return runner


def _tokens(llm, runner, prompts, params) -> list[list[int]]:
    eager, llm.runner = llm.runner, runner
    try:
        return [o.token_ids for o in llm.generate(prompts, params)]
    finally:
        llm.runner = eager


def test_buckets_round_up_to_powers_of_two():
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 64, 65, 512)] == [1, 2, 4, 8, 64, 128, 512]
    assert batch_bucket(513) is None
    assert [span_bucket(s, 16) for s in (1, 16, 17, 33, 48, 65)] == [16, 16, 32, 64, 64, 128]


def test_padded_buffers_give_the_eager_tokens_in_every_mode(llm):
    """Three rows in the bucket of four, key spans padded to whole power-of-two pages; greedy and
    sampled (the sampler's draws do not depend on the path)."""
    runner = _buffered_runner(llm.model)
    buckets = set()  # a run needing a larger pool than the graphs' drops them: collect each run's
    for mode in MODES:
        for extra in ({}, {"temperature": 0.8, "seed": 5}):
            params = _params(mode, **extra)
            assert _tokens(llm, runner, PROMPTS[:3], params) == [o.token_ids for o in llm.generate(PROMPTS[:3], params)]
            buckets |= set(runner.graphs.buckets)
    assert {kind for kind, *_ in buckets} == {"last", "all", "draft"}
    assert {batch for _, batch, _, _ in buckets if batch <= 4} >= {4}
    assert ("draft", 4, 20, 64) in buckets  # quadratic's pass: b(b+1) = 20 tokens per row
    assert not runner.fuses_parts  # a graphed pass runs alone: no AR rows ride beside it


def test_without_a_draft_lora_and_in_a_mixed_batch(llm_nolora):
    runner = _buffered_runner(llm_nolora.model)
    mixed = [_params(m) for m in MODES]
    expected = [o.token_ids for o in llm_nolora.generate(PROMPTS, mixed)]
    assert _tokens(llm_nolora, runner, PROMPTS, mixed) == expected
    assert "draft" not in {kind for kind, *_ in runner.graphs.buckets}


def test_graphs_belong_to_one_pool(llm):
    """Graphs write their pool in place: the runner hands it to every engine it can serve, and a
    larger pool drops them."""
    runner = _buffered_runner(llm.model)
    pool = runner.new_pool(256, 16)
    assert runner.graphs.pool is pool and runner.new_pool(128, 16) is pool
    runner.graphs.prepare(max_batch=3, max_span=64)
    # Batch 1, 2, 4 at key spans 16, 32, 64 whose keys fit the pool's 256 slots: all nine.
    assert runner.graphs.buckets == sorted(("last", b, 1, s) for b in (1, 2, 4) for s in (16, 32, 64))
    held = pool.allocate(1)
    assert runner.new_pool(128, 16) is not pool  # a row holds a page of it: a pool of its own
    pool.release(held)
    bigger = runner.new_pool(512, 16)
    assert bigger is not pool and runner.graphs.pool is bigger and runner.graphs.buckets == []


def test_a_failed_capture_runs_its_pass_eager(llm):
    def out_of_memory(static):
        raise torch.cuda.OutOfMemoryError("no memory for this graph")

    runner = _buffered_runner(llm.model, capture=out_of_memory)
    params = _params("selfspec")
    assert _tokens(llm, runner, PROMPTS[:2], params) == [o.token_ids for o in llm.generate(PROMPTS[:2], params)]
    assert runner.graphs.buckets == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("lora", [True, False])
def test_cuda_graphs_give_the_eager_tokens(tiny_dir, lora):
    graphed = LLM(tiny_dir, dtype="float32", device="cuda", load_draft_lora=lora)
    eager = LLM(tiny_dir, dtype="float32", device="cuda", load_draft_lora=lora, compile=False)
    assert graphed.runner.graphs is not None and eager.runner.graphs is None
    for prompts in (PROMPTS[:1], PROMPTS[:3]):
        for mode in MODES:
            params = _params(mode)
            assert [o.token_ids for o in graphed.generate(prompts, params)] == [
                o.token_ids for o in eager.generate(prompts, params)
            ]
    mixed = [_params(m) for m in MODES]
    assert [o.token_ids for o in graphed.generate(PROMPTS, mixed)] == [
        o.token_ids for o in eager.generate(PROMPTS, mixed)
    ]
    kinds = {kind for kind, *_ in graphed.runner.graphs.buckets}
    assert kinds == ({"last", "all", "draft"} if lora else {"last", "all"})
    assert graphed.runner.graphs.bytes > 0
