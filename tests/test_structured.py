"""Structured output (trimode/structured.py): what AR and self-spec emit under a grammar is valid,
self-spec emits exactly AR's tokens at temperature 0 (its verify masks each position after the
drafts before it) and accepts drafts doing so; diffusion is refused by name. On the embedded model,
whose outputs mean something."""

from __future__ import annotations

import json
import re

import pytest

from trimode import LLM, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
PROMPTS = ["def parse(line):", "Sort: 3 1 2", "import os"]


@pytest.fixture(scope="module")
def embedded():
    return LLM(compile=False)


@pytest.mark.parametrize(
    "spec,valid",
    [
        ({"json": SCHEMA}, lambda t: set(json.loads(t)) == {"name", "age"} and isinstance(json.loads(t)["age"], int)),
        ({"json_object": True}, lambda t: isinstance(json.loads(t), dict)),
        ({"regex": "[0-9]{3}-[a-z]{2,5}"}, lambda t: re.fullmatch("[0-9]{3}-[a-z]{2,5}", t) is not None),
        ({"choice": ["yes", "no", "maybe"]}, lambda t: t in ("yes", "no", "maybe")),
    ],
)
def test_outputs_follow_the_grammar_and_selfspec_equals_ar(embedded, spec, valid):
    params = dict(temperature=0.0, max_tokens=48, structured=spec, block_length=8)
    ar = embedded.generate(PROMPTS, SamplingParams(mode="ar", **params))
    spec_out = embedded.generate(PROMPTS, SamplingParams(mode="selfspec", **params))
    assert [o.token_ids for o in spec_out] == [o.token_ids for o in ar]
    quadratic = SamplingParams(mode="selfspec", spec="quadratic", **{**params, "block_length": 4})
    assert [o.token_ids for o in embedded.generate(PROMPTS, quadratic)] == [o.token_ids for o in ar]
    finished = [o for o in ar if o.finish_reason == "stop"]  # a small model may run out of budget first
    assert finished and all(valid(o.text) for o in finished), [o.text for o in ar]


def test_selfspec_accepts_drafts_under_a_grammar_and_samples_valid_outputs(embedded):
    for spec, block in (("linear", 32), ("quadratic", 4)):
        params = dict(temperature=0.0, spec=spec, block_length=block, max_tokens=48, structured={"json": SCHEMA})
        out = embedded.generate(PROMPTS, SamplingParams(mode="selfspec", **params))
        assert max(c for o in out for c in o.mode_stats["tokens_per_cycle"]) > 1, spec
    sampled = embedded.generate(
        PROMPTS * 3,
        [
            SamplingParams(mode=m, max_tokens=48, structured={"json": SCHEMA}, temperature=1.0, seed=s)
            for s, m in enumerate(["ar", "selfspec"] * 4 + ["ar"])
        ],
    )
    assert all(set(json.loads(o.text)) == {"name", "age"} for o in sampled if o.finish_reason == "stop")


def test_diffusion_and_bad_grammars_are_refused_by_name(embedded):
    with pytest.raises(ValueError, match="structured output needs mode ar, selfspec or auto"):
        SamplingParams(temperature=0.0, mode="diffusion", structured={"regex": "a+"})
    with pytest.raises(ValueError, match="SamplingParams.structured must be one of"):
        SamplingParams(temperature=0.0, structured={"xml": "<a/>"})
    with pytest.raises(ValueError, match="structured output: "):
        embedded.generate("x", SamplingParams(temperature=0.0, structured={"json": {"type": "nonsense"}}))
