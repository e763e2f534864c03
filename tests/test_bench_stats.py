"""The bench measures itself: interleaved configurations, bootstrap intervals, an A/A control and a
tokens-per-forward bound, checked on a fake model whose per-token costs are known, on a fake clock."""

from __future__ import annotations

import math

import pytest
from conftest import fake_output

from trimode.bench import runner
from trimode.bench.runner import BenchConfig, add_intervals, reference_key, sweep, with_control
from trimode.bench.stats import rate_interval
from trimode.bench.suites import BenchPrompt

PROMPTS = [BenchPrompt(id=str(i), category="c", prompt=f"p{i}") for i in range(8)]


class ClockedLLM:
    """A fake model on a fake clock. A batch costs `cost[mode]` seconds per token per row, times
    (1 + drift * now): the machine slows down as the run goes on. Self-spec takes 1 forward per 3
    tokens (plus its prefill), the others one per token."""

    def __init__(self, tokenizer, cost: dict[str, float], drift: float = 0.0) -> None:
        self.tokenizer, self.cost, self.drift = tokenizer, cost, drift
        self.now = 0.0
        self.calls: list[tuple[str, int | None, int]] = []  # (mode, block_length, first prompt's id)

    def perf_counter(self) -> float:
        return self.now

    def generate(self, prompts, params, use_tqdm=False):
        sp = params[0]
        self.calls.append((sp.mode, sp.block_length, prompts[0][-1]))
        n = sp.max_tokens
        self.now += self.cost[sp.mode] * len(prompts) * n * (1 + self.drift * self.now)
        forwards = 1 + (math.ceil(n / 3) if sp.mode == "selfspec" else n)
        return [fake_output(p, sp.mode, n, forwards) for p in prompts]


@pytest.fixture
def clocked(llm, monkeypatch):
    def make(cost: dict[str, float], drift: float = 0.0) -> ClockedLLM:
        fake = ClockedLLM(llm.tokenizer, cost, drift)
        monkeypatch.setattr(runner, "time", fake)  # the runner's clock is the fake's
        monkeypatch.setattr(runner, "encode", lambda _, prompts: [[1, i] for i in range(len(prompts))])
        return fake

    return make


def test_configurations_run_round_robin_over_batches_in_a_shuffled_order_per_repeat(clocked):
    """ABBA within a repeat: its shuffled order, reversed on every other batch."""
    fake = clocked({"ar": 1e-3, "selfspec": 1e-3})
    configs = [BenchConfig("ar", 1), BenchConfig("selfspec", 1, 8), BenchConfig("selfspec", 1, 16)]
    sw = sweep(fake, PROMPTS, configs, 6, warmup=1, show_progress=False, repeats=3)
    timed = fake.calls[3:]  # after one warm-up batch per configuration
    assert len(timed) == 3 * 3 * len(PROMPTS) and sw.repeats == 3
    orders = []
    for r in range(3):
        rnd = timed[r * 24 : (r + 1) * 24]
        # batch k of every configuration before batch k + 1 of any
        assert [c[2] for c in rnd] == [k for k in range(len(PROMPTS)) for _ in configs]
        orders.append(tuple((c[0], c[1]) for c in rnd[:3]))
        for k in range(len(PROMPTS)):  # the repeat's order, reversed on odd batches
            order = tuple((c[0], c[1]) for c in rnd[3 * k : 3 * k + 3])
            assert order == (orders[-1] if k % 2 == 0 else orders[-1][::-1])
    assert len(set(orders)) > 1  # shuffled per repeat
    assert {len(u) for u in sw.units.values()} == {3 * len(PROMPTS)}


def test_a_slower_configuration_shows_up_slower_on_a_drifting_machine(clocked):
    """Diffusion costs 1.5x AR per token; the machine slows to ~3x over the run, so run back to back
    the later configuration would look ~2x slower whatever it cost. Interleaved, the paired ratio is
    within a few percent of 1/1.5, clearly below 1, and the A/A control holds."""
    fake = clocked({"ar": 1e-3, "diffusion": 1.5e-3}, drift=1.0 / 0.3)
    configs = with_control([BenchConfig("ar", 1), BenchConfig("diffusion", 1, 8, 0.9)])
    sw = sweep(fake, PROMPTS, configs, 6, warmup=0, show_progress=False, repeats=4)
    diff, control = sw.results[1], sw.results[2]
    assert fake.now * 1.0 / 0.3 > 2.0  # the drift: the last batch costs over 3x the first
    assert diff["speedup_vs_ar_ci"]["median"] == pytest.approx(1 / 1.5, rel=0.05)
    assert diff["speedup_vs_ar_ci"]["hi"] < 0.8
    assert control["control"] and control["speedup_vs_ar_ci"]["lo"] <= 1.0 <= control["speedup_vs_ar_ci"]["hi"]
    assert sw.warnings == []


def test_the_aa_control_fires_when_one_copy_is_slowed(clocked):
    fake = clocked({"ar": 1e-3})
    sw = sweep(fake, PROMPTS, with_control([BenchConfig("ar", 1)]), 6, warmup=0, show_progress=False, repeats=2)
    units = list(sw.units.values())
    assert add_intervals(sw.results, units, reference_key) == []
    control = next(cfg for cfg in sw.units if cfg.control)
    for u in sw.units[control]:
        u.seconds *= 1.2
    (warning,) = add_intervals(sw.results, units, reference_key)
    assert warning.startswith("A/A control: ar bs1 (A/A) over ar bs1") and "excludes 1.0" in warning


def test_a_speed_up_above_its_tokens_per_forward_prediction_is_flagged(clocked):
    """Self-spec here takes 1 forward per 3 tokens; a clock that makes it 5x faster than AR cannot be
    right (a forward is never cheaper than an AR step), and is flagged."""
    fake = clocked({"ar": 5e-3, "selfspec": 1e-3})
    sw = sweep(fake, PROMPTS, [BenchConfig("ar", 1), BenchConfig("selfspec", 1, 8)], 6, 0, False, repeats=2)
    spec = sw.results[1]
    assert spec["tpf_prediction"] == pytest.approx((6 / 3) / (6 / 7), rel=1e-3)
    (warning,) = sw.warnings
    assert "exceeds what its tokens per forward allow" in warning


def test_bootstrap_intervals_on_known_samples():
    steady = rate_interval([10.0] * 20, [2.0] * 20)
    assert steady.median == steady.lo == steady.hi == 5.0
    noisy = rate_interval([10.0] * 40, [1.0, 3.0] * 20)
    assert noisy.lo < 5.0 < noisy.hi and 0.02 < noisy.half_width < 0.3
    # Paired: the base took exactly twice as long on every unit, so the ratio is 2 with no spread,
    # however noisy the units are; unpaired draws would spread it.
    paired = rate_interval([10.0] * 40, [1.0, 3.0] * 20, [10.0] * 40, [2.0, 6.0] * 20)
    assert paired.median == paired.lo == paired.hi == pytest.approx(2.0)
    with pytest.raises(ValueError, match="same units"):
        rate_interval([1.0], [1.0], [1.0, 2.0], [1.0, 1.0])


def test_an_aa_control_of_too_few_batches_is_flagged_not_trusted(clocked):
    fake = clocked({"ar": 1e-3})
    sw = sweep(fake, PROMPTS[:2], with_control([BenchConfig("ar", 1)]), 6, 0, show_progress=False, repeats=2)
    (warning,) = sw.warnings
    assert "has 4 timed units, too few" in warning and "--repeats" in warning


def test_more_forwards_than_ar_are_bounded_by_one_not_by_the_prediction(clocked):
    """Self-spec taking more forwards than AR (a draft that is never accepted) over a prefill that is
    most of the time: its speed-up is near 1 while its tokens-per-forward ratio is far below. That
    is no error; a speed-up above 1 with more forwards than AR is."""
    fake = clocked({"ar": 1e-3, "selfspec": 1e-3})
    sw = sweep(fake, PROMPTS, [BenchConfig("ar", 1), BenchConfig("selfspec", 1, 8)], 6, 0, False, repeats=2)
    spec = sw.results[1]
    for r in sw.results:  # pretend self-spec took 3x AR's forwards
        r["tokens_per_forward"] = 1.0 if r["mode"] == "ar" else 1 / 3
    assert spec["speedup_vs_ar_ci"]["lo"] > 1 / 3
    assert add_intervals(sw.results, list(sw.units.values()), reference_key) == []
    for u in sw.units[BenchConfig("selfspec", 1, 8)]:
        u.seconds /= 1.5
    (warning,) = add_intervals(sw.results, list(sw.units.values()), reference_key)
    assert "exceeds what its tokens per forward allow (1.00)" in warning
