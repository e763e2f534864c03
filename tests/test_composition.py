"""Rows compose: a request batched with any others, whatever features either uses, equals the same
request alone (token ids, text, finish reason, logprobs).

The join matrix is generated, not hand-picked: every (running kind, newcomer kind) pair of KINDS,
in every decoding shape of SHAPES at once (each shape is its own group, so one engine run holds
six independent joins, and their passes share forwards as riders and leads do in serving). The
running request is prefilled first; its newcomer joins its group 2 to 6 steps later, so the groups
are at varied stages (self-spec's two stages are also each pinned on their own, below). A kind
names a feature family; which parameters it takes (which penalty, which grammar, which seed) is
drawn per pair from a seeded random generator, so the matrix also covers combinations within one
request. Pins issue 24 items 1 and 2: a logit control joining rows without one (a size mismatch in
`DecodeBatch.extend`) and a sampled self-spec row joining greedy ones (`KeyError: 'q'`) failed the
whole group.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from trimode import LLM, SamplingParams
from trimode.decoding.selfspec import SelfSpecRows
from trimode.engine.llm_engine import LLMEngine
from trimode.outputs import GenerationOutput

SHAPES: list[dict[str, Any]] = [
    dict(mode="ar"),
    dict(mode="diffusion", block_length=4, threshold=0.9),
    dict(mode="diffusion", block_length=8, threshold=None),
    dict(mode="selfspec", block_length=4),
    dict(mode="selfspec", block_length=8),
    dict(mode="selfspec", spec="quadratic", block_length=4),
]
TOKENS = 8
PROMPTS = ["def parse(line):", "Sort: 42 7 19 3", "import os\n", "class Stack:", "Add: 457 + 268"]


def _controls(rng: random.Random) -> dict[str, Any]:
    return rng.choice(
        [
            dict(presence_penalty=0.8),
            dict(frequency_penalty=0.5, presence_penalty=0.2),
            dict(repetition_penalty=1.4),
            dict(logit_bias={rng.randrange(40, 400): 6.0}),
            dict(min_tokens=TOKENS - 2),
        ]
    )


def _grammar(rng: random.Random) -> dict[str, Any]:
    return rng.choice(
        [
            dict(structured={"regex": "[a-z]+( [a-z]+)*"}),
            dict(structured={"choice": ["return x", "pass", "yield"]}),
            dict(structured={"json_object": True}),
        ]
    )


def _seeded(rng: random.Random) -> dict[str, Any]:
    return dict(temperature=rng.choice([0.7, 1.0]), seed=rng.randrange(2**32), top_k=rng.choice([0, 40]))


def _ends_early(rng: random.Random) -> dict[str, Any]:
    return rng.choice(
        [
            dict(stop=["e"], include_stop_str_in_output=True),
            dict(stop=[")", "\n"]),
            dict(max_tokens=1),
            dict(stop_token_ids=[rng.randrange(40, 400)]),
        ]
    )


# A feature family -> its parameters, drawn per use: each family that keeps per-row state (the
# sampler, the logit controls, grammars, logprobs, self-spec's draft distribution) or ends rows
# early (stop strings, max_tokens, n samples leaving at different steps).
KINDS: dict[str, Callable[[random.Random], dict[str, Any]]] = {
    "greedy": lambda rng: {},
    "seeded": lambda rng: {**_seeded(rng), **rng.choice([{}, dict(top_p=0.9), dict(min_p=0.1)])},
    "controls": lambda rng: {**_controls(rng), **rng.choice([{}, _seeded(rng)])},
    "grammar": lambda rng: {**_grammar(rng), **rng.choice([{}, _seeded(rng), _controls(rng)])},
    "logprobs": lambda rng: rng.choice([dict(logprobs=3), dict(logprobs=0, prompt_logprobs=2, **_seeded(rng))]),
    "ends_early": lambda rng: {**_ends_early(rng), **rng.choice([{}, dict(ignore_eos=True), _seeded(rng)])},
    "n=2": lambda rng: dict(n=2, **_seeded(rng), **rng.choice([{}, _controls(rng), dict(logprobs=1)])),
}
PAIRS = [(a, b) for a in KINDS for b in KINDS]
VARIANTS = 2  # parameter draws per (kind, shape, role): outputs alone are computed once per draw


def _params(kind: str, shape: int, role: str, variant: int) -> SamplingParams:
    rng = random.Random(f"{kind}|{shape}|{role}|{variant}")
    extra = KINDS[kind](rng)
    if SHAPES[shape]["mode"] == "diffusion" and "structured" in extra:  # refused by name
        extra = {k: v for k, v in extra.items() if k != "structured"} | dict(stop=["e"])
    return SamplingParams(**{"max_tokens": TOKENS, "temperature": 0.0, **SHAPES[shape], **extra})


def _logprob_values(out: GenerationOutput) -> list[float]:
    return [lp[t].logprob for lp, t in zip(out.logprobs or [], out.token_ids)]


def assert_same(got: GenerationOutput, alone: GenerationOutput, what: str) -> None:
    assert got.token_ids == alone.token_ids, what
    assert (got.text, got.finish_reason) == (alone.text, alone.finish_reason), what
    assert got.num_forwards == alone.num_forwards, what
    assert _logprob_values(got) == pytest.approx(_logprob_values(alone), abs=1e-4), what
    assert (got.prompt_logprobs is None) == (alone.prompt_logprobs is None), what


@pytest.fixture(scope="module")
def embedded() -> LLM:
    return LLM(compile=False)


@pytest.fixture(scope="module")
def alone(embedded: LLM) -> Callable[[str, SamplingParams], GenerationOutput]:
    """Each request's output alone (one sample's params), computed once."""
    cache: dict[str, GenerationOutput] = {}

    def run(prompt: str, params: SamplingParams) -> GenerationOutput:
        key = repr((prompt, params))
        if key not in cache:
            cache[key] = embedded.generate(prompt, params)[0]
        return cache[key]

    return run


@pytest.mark.parametrize("running,newcomer", PAIRS, ids=[f"{b}-joins-{a}" for a, b in PAIRS])
def test_a_newcomer_of_any_kind_joins_running_rows_of_any_kind(embedded, alone, running, newcomer):
    engine = embedded.engine(kv_cache_tokens=8192)
    jobs: list[tuple[str, str, SamplingParams]] = []  # (request id, prompt, one sample's params)

    def add(role: str, kind: str, partner: str) -> None:
        variant = list(KINDS).index(partner) % VARIANTS
        for s in range(len(SHAPES)):
            prompt = PROMPTS[(s + len(role)) % len(PROMPTS)]
            for j, sample in enumerate(_params(kind, s, role, variant).samples()):
                rid = f"{role}{s}.{j}"
                engine.add_request(rid, prompt, sample)
                jobs.append((rid, prompt, sample))

    add("running", running, newcomer)
    join_after = 2 + PAIRS.index((running, newcomer)) % 5  # steps: the groups are at varied stages then
    results = run(engine, {join_after: lambda: add("newcomer", newcomer, running)})
    for rid, prompt, sample in jobs:
        assert_same(results[rid], alone(prompt, sample), f"{rid} {sample}")


def run(engine: LLMEngine, arrivals: dict[int, Callable[[], None]]) -> dict[str, GenerationOutput]:
    """Step `engine` to completion; `arrivals[step]()` adds requests before that step."""
    results: dict[str, GenerationOutput] = {}
    step = 0
    while engine.has_unfinished_requests() or step <= max(arrivals):
        if step in arrivals:
            arrivals[step]()
        for out in engine.step():
            assert out.error is None, f"{out.request_id}: {out.error}"
            if out.output is not None:
                results[out.request_id] = out.output
        step += 1
    return results


@pytest.mark.parametrize("drafting", [True, False], ids=["drafting", "verifying"])
@pytest.mark.parametrize("running,newcomer", [("greedy", "seeded"), ("seeded", "greedy"), ("greedy", "n=2")])
def test_selfspec_rows_join_at_either_stage_of_a_cycle(embedded, alone, running, newcomer, drafting):
    """A self-spec newcomer joins rows about to draft, and rows about to verify: a sampled row
    joining greedy rows that are about to verify failed the group (`KeyError: 'q'`, issue 24 item 2:
    greedy rows draft without keeping a draft distribution, and the verify read it)."""
    engine = embedded.engine(kv_cache_tokens=8192)
    shape = SHAPES.index(dict(mode="selfspec", block_length=4))
    jobs = [("running", PROMPTS[0], _params(running, shape, "running", 0).samples())]
    jobs.append(("newcomer", PROMPTS[1], _params(newcomer, shape, "newcomer", 0).samples()))
    engine.add_request("running.0", PROMPTS[0], jobs[0][2][0])
    engine.step()  # its prefill
    group = next(iter(engine.groups.values()))
    while group.batch.state(SelfSpecRows).drafting != [drafting] or engine.scheduler._prefilled_last:
        engine.step()  # its passes (a step after a prefill is a pass: the next one prefills)
    for j, sample in enumerate(jobs[1][2]):
        engine.add_request(f"newcomer.{j}", PROMPTS[1], sample)
    engine.step()  # the newcomer's prefill; the group has not moved
    assert group.batch.state(SelfSpecRows).drafting[0] == drafting and group.batch.size > 1
    results = run(engine, {0: lambda: None})
    for role, prompt, samples in jobs:
        for j, sample in enumerate(samples):
            assert_same(results[f"{role}.{j}"], alone(prompt, sample), f"{role} {sample}")
