"""Mode auto: the engine moves each auto row between exact decodings (AR, linear and quadratic
self-spec, their block lengths) by what it measures, so outputs are AR's whatever it picks."""

from __future__ import annotations

import itertools

import pytest
from conftest import PROMPTS
from test_sampling import exact_joint, total_variation

from trimode import SamplingParams
from trimode.decoding import EXACT_DECODINGS, LOSSY_DECODINGS
from trimode.engine import auto
from trimode.engine.auto import AutoPolicy, PassCosts


def costs(per_token: float, fixed: float = 1e-3) -> PassCosts:
    """Pass seconds = fixed + per_token x tokens, at every calibrated size."""
    return PassCosts({n: fixed + per_token * n for n in (1, 8, 32, 128, 512, 4096)})


@pytest.mark.parametrize("rows", [1, 64])
def test_cheap_block_passes_pick_self_spec_and_dear_ones_pick_ar(rows):
    """Block passes as cheap as an AR step (a GPU's weight-bound forward): self-spec; passes whose
    cost grows with every token (a compute-bound forward): AR. At batch 1 and 64 alike."""
    cheap = AutoPolicy(EXACT_DECODINGS, costs(per_token=1e-6))  # a 72-token pass: 7% dearer than 1 token
    assert cheap.choose(rows)[0] == "selfspec"
    dear = AutoPolicy(EXACT_DECODINGS, costs(per_token=1e-3, fixed=0.0))
    assert dear.choose(rows) == ("ar", 1, "linear")
    # What the rows accept decides too: drafts never accepted make every block pass a loss.
    for choice in EXACT_DECODINGS[1:]:
        for _ in range(8):
            cheap.cycles(choice, [1] * 64)
    assert cheap.choose(rows) == ("ar", 1, "linear")
    # Rows stay on what they run unless another decoding is expected to be 10% faster.
    b8, b16 = ("selfspec", 8, "linear"), ("selfspec", 16, "linear")
    close = AutoPolicy((b8, b16), costs(per_token=0.0), {b8: 6.0, b16: 6.3})
    assert close.choose(rows) == b16 and close.choose(rows, current=b8) == b8
    close.tokens_per_cycle[b16] = 7.0
    assert close.choose(rows, current=b8) == b16


def test_a_step_budget_that_splits_a_decoding_into_groups_counts_their_passes():
    """64 rows of b 16 under a 512-token budget are two groups, two passes a cycle each: with a
    forward's cost fixed plus per token, AR's one 64-token pass wins where one 1024-token pass
    would not."""
    policy = AutoPolicy((("ar", 1, "linear"), ("selfspec", 16, "linear")), costs(per_token=2e-5, fixed=1e-2))
    policy.tokens_per_cycle[("selfspec", 16, "linear")] = 6.0
    assert policy.choose(64)[0] == "selfspec"
    assert policy.choose(64, pass_tokens=512) == ("ar", 1, "linear")


def test_prefill_steps_between_passes_favour_ar_which_rides_in_them():
    """A server whose arrivals prefill every other step (two thirds of the time): AR rows emit a
    token in those steps, block-mode rows only wait, so a decoding that wins between passes alone
    loses to AR."""
    ar, b16 = ("ar", 1, "linear"), ("selfspec", 16, "linear")
    policy = AutoPolicy((ar, b16), costs(per_token=2e-5, fixed=1e-2), {b16: 6.0})
    assert policy.choose(64) == b16
    for i in range(200):
        policy.step(prefill=i % 2 == 0, seconds=0.02 if i % 2 == 0 else 0.01)
    assert policy.prefill_seconds / policy.step_seconds == pytest.approx(2 / 3, abs=0.02)
    assert policy.choose(64) == ar
    for _ in range(200):  # arrivals stop: passes only again
        policy.step(prefill=False, seconds=0.01)
    assert policy.choose(64) == b16


def test_pass_costs_interpolate_and_extrapolate_what_they_measured():
    c = PassCosts()
    with pytest.raises(ValueError, match="calibrate"):
        c(8)
    c.observe(8, 0.010)
    c.observe(32, 0.030)
    assert c(8) == 0.010 and c(20) == pytest.approx(0.020) and c(64) == pytest.approx(0.060) and c(1) == 0.010
    c.observe(31, 0.040)  # the nearest power of two: 32, averaged in
    assert c(32) == pytest.approx(0.8 * 0.030 + 0.2 * 0.040)


def switching(monkeypatch) -> None:
    """Every decision picks the next exact decoding in turn: rows move at every cycle boundary."""
    turn = itertools.cycle(EXACT_DECODINGS)
    monkeypatch.setattr(AutoPolicy, "choose", lambda self, *args, **kwargs: next(turn))


def test_rows_moving_between_decodings_every_cycle_give_ar_tokens(llm, monkeypatch):
    llm.runner.auto = AutoPolicy(EXACT_DECODINGS, costs(per_token=0.0))  # no calibration in tests
    switching(monkeypatch)
    budgets = [30, 30, 13, 30]
    ar = llm.generate(PROMPTS, [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in budgets])
    out = llm.generate(
        PROMPTS, [SamplingParams(temperature=0.0, mode="auto", max_tokens=n, ignore_eos=True) for n in budgets]
    )
    assert [o.token_ids for o in out] == [o.token_ids for o in ar]
    served = {name for o in out for name in o.decodings}
    assert {"ar", "selfspec_b4", "quadratic_b2"} <= served and all(o.mode == "auto" for o in out)
    cycles = [o.decodings for o in out]
    assert all(sum(c.values()) <= o.num_forwards for c, o in zip(cycles, out))


def test_switching_rows_sample_the_ar_distribution(llm, monkeypatch):
    llm.runner.auto = AutoPolicy(EXACT_DECODINGS, costs(per_token=0.0))
    switching(monkeypatch)
    settled = llm.generate(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))[0]
    ids = settled.prompt_token_ids + settled.token_ids
    base = dict(temperature=1.5, top_k=2, max_tokens=4, ignore_eos=True)
    exact = exact_joint(llm, ids, SamplingParams(**base), 4)
    n = 2000
    outs = llm.generate([ids] * n, [SamplingParams(mode="auto", seed=s, **base) for s in range(n)])
    tv = total_variation(outs, exact)
    assert tv < 0.05, tv


def test_auto_learns_the_model_it_runs(llm):
    """Without a scripted choice: the engine times forwards itself, tries what its priors favour
    and keeps what pays; the output is AR's either way."""
    llm.runner.auto = None
    params = SamplingParams(temperature=0.0, mode="auto", max_tokens=24, ignore_eos=True)
    out = llm.generate(PROMPTS, params)
    assert [o.token_ids for o in out] == [
        o.token_ids for o in llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    ]
    assert llm.runner.auto is not None and set(llm.runner.auto.costs.seconds) >= {1, 8, 32}
    assert auto.prior_tokens_per_cycle(("selfspec", 8, "linear")) == 4.5


def test_rows_moving_keep_their_features(llm, monkeypatch):
    """Penalties, a bias, min_tokens, a grammar and logprobs follow a row through every move: the
    same tokens and logprobs as AR's."""
    llm.runner.auto = AutoPolicy(EXACT_DECODINGS, costs(per_token=0.0))
    switching(monkeypatch)
    features = [
        dict(presence_penalty=1.5, logprobs=2),
        dict(repetition_penalty=1.8, logit_bias={5: 8.0}),
        dict(min_tokens=10, stop_token_ids=[5]),
        dict(structured={"regex": "[a-z]+( [a-z]+)*"}, logprobs=0),
    ]
    ar = llm.generate(PROMPTS, [SamplingParams(temperature=0.0, max_tokens=20, **f) for f in features])
    out = llm.generate(PROMPTS, [SamplingParams(mode="auto", temperature=0.0, max_tokens=20, **f) for f in features])
    assert [o.token_ids for o in out] == [o.token_ids for o in ar]
    for a, o in zip(ar, out):
        if a.logprobs:
            want = [p[t].logprob for p, t in zip(a.logprobs, a.token_ids)]
            assert [p[t].logprob for p, t in zip(o.logprobs, o.token_ids)] == pytest.approx(want, abs=1e-4)
    assert len({name for o in out for name in o.decodings}) > 2


def test_only_rows_that_opted_in_may_run_diffusion():
    """Diffusion revealing 20 tokens a pass beats every exact decoding, but only `auto_lossy` rows
    may take it; a pass where a diffusion row's block is not done counts 0 tokens."""
    d32 = LOSSY_DECODINGS[-1]
    policy = AutoPolicy(EXACT_DECODINGS, costs(per_token=1e-6), {d32: 20.0}, lossy=LOSSY_DECODINGS)
    assert policy.choose(4, lossy=True) == d32 and policy.choose(4)[0] == "selfspec"
    # Rows with one token left gain nothing from a block: exact rows at their end stay AR.
    assert policy.choose(4, left=[1, 1, 1, 1]) == EXACT_DECODINGS[0]
    policy.cycles(d32, [0, 0, 0, 32])
    assert policy.tokens_per_cycle[d32] == pytest.approx(0.95**4 * 20 + (1 - 0.95**4) * 8)
    with pytest.raises(ValueError, match="auto_lossy.*mode='auto'"):
        SamplingParams(temperature=0.0, mode="ar", auto_lossy=True)
    with pytest.raises(ValueError, match="without auto_lossy"):
        SamplingParams(temperature=0.0, mode="auto", auto_lossy=True, structured={"regex": "[a-z]+"})


def test_a_lossy_row_decodes_as_diffusion_from_where_it_moved(llm, monkeypatch):
    """A lossy auto row that runs AR for a few cycles and then diffusion gives AR's tokens, then
    what a diffusion request continuing from them gives; an exact auto row beside it, AR's."""
    llm.runner.auto = AutoPolicy(EXACT_DECODINGS, costs(per_token=0.0), lossy=LOSSY_DECODINGS)
    calls = itertools.count()

    def choose(self, rows, current=None, pass_tokens=None, lossy=False, left=()):
        return LOSSY_DECODINGS[-1] if lossy and next(calls) >= 4 else EXACT_DECODINGS[0]

    monkeypatch.setattr(AutoPolicy, "choose", choose)
    base = dict(temperature=0.0, max_tokens=40, ignore_eos=True)
    lossy, exact = llm.generate(
        PROMPTS[:2], [SamplingParams(mode="auto", auto_lossy=True, **base), SamplingParams(mode="auto", **base)]
    )
    ar = llm.generate(PROMPTS[:2], SamplingParams(**base))
    assert exact.token_ids == ar[1].token_ids and set(exact.decodings) == {"ar"}
    assert set(lossy.decodings) == {"ar", "diffusion_b32"}
    # The first token comes from the prefill, then one per AR cycle; the last of those seeds the block.
    k = 1 + lossy.decodings["ar"]
    assert lossy.token_ids[:k] == ar[0].token_ids[:k]
    rest = llm.generate(
        lossy.prompt_token_ids + lossy.token_ids[: k - 1],
        SamplingParams(temperature=0.0, mode="diffusion", block_length=32, max_tokens=40 - k + 1, ignore_eos=True),
    )[0]
    assert lossy.token_ids[k - 1 :] == rest.token_ids
