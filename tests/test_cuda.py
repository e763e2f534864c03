"""The same engine on CUDA (skipped where there is no GPU, e.g. in CI)."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS

from trimode import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_cuda_float32_matches_cpu_and_keeps_the_invariants(tiny_dir, llm):
    gpu = LLM(tiny_dir, dtype="float32", device="cuda")
    params = dict(temperature=0.0, max_tokens=24, block_length=8, ignore_eos=True)
    ar = gpu.generate(PROMPTS, SamplingParams(mode="ar", **params))
    assert [o.token_ids for o in gpu.generate(PROMPTS, SamplingParams(mode="selfspec", **params))] == [
        o.token_ids for o in ar
    ]
    cpu = llm.generate(PROMPTS, SamplingParams(mode="ar", **params))
    assert [o.token_ids for o in ar] == [o.token_ids for o in cpu]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("mode", ["ar", "diffusion", "selfspec"])
def test_cuda_half_precision_runs_every_mode(tiny_dir, dtype, mode):
    gpu = LLM(tiny_dir, dtype=dtype, device="cuda")
    out = gpu.generate(
        PROMPTS, SamplingParams(mode=mode, max_tokens=20, block_length=8, ignore_eos=True, temperature=0.7, seed=1)
    )
    assert all(len(o.token_ids) == 20 for o in out)
