"""At most one host sync per engine step (one packed transfer of what the step emitted): counted on
CPU by intercepting every read of tensor values into Python."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch

from trimode import SamplingParams
from trimode.bench.host_syncs import HostSyncCounter


def test_the_counter_sees_reads_and_data_dependent_shapes():
    x = torch.arange(6)
    with HostSyncCounter() as c:
        x.tolist()
        bool(x.any())
        int(x.max())
        x.nonzero()
        x[x > 2]
        x + 1
    assert c.by_name == Counter({"tolist": 1, "__bool__": 1, "__int__": 1, "nonzero": 1, "bool-index": 1})


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, mode="ar"),
        SamplingParams(temperature=0.0, mode="diffusion", block_length=8),
        SamplingParams(mode="diffusion", block_length=8, threshold=None, temperature=0.7, top_k=5),
        SamplingParams(temperature=0.0, mode="selfspec", block_length=8),
        SamplingParams(mode="selfspec", block_length=8, temperature=0.8, top_p=0.9),
    ],
    ids=["ar", "diffusion", "diffusion-sampled", "selfspec", "selfspec-sampled"],
)
def test_every_engine_step_syncs_the_host_at_most_once(llm, params):
    """Pins: an AR token took 3 host reads, a self-spec cycle 8, a diffusion block ~42 (lengths.max(),
    .tolist() of flags, bool() of any/all); the engine now keeps lengths and phases on the host."""
    engine = llm.engine(max_batch=4)
    prompts = ["def add(a, b):", "import os", "class Foo:", "x = [1, 2"]
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, dataclasses.replace(params, max_tokens=30 + 7 * i, ignore_eos=True))
    steps = Counter()
    while engine.has_unfinished_requests():
        with HostSyncCounter() as c:
            engine.step()
        steps[c.total] += 1
    assert max(steps) == 1 and sum(steps.values()) > 20, steps
