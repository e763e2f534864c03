"""Compiled forwards (engine/compiled.py) against the eager path, token for token, float32 on CPU:
every mode, with and without the draft LoRA, at batch 1 and at a batch between powers of two, and
a mixed-mode batch (whose several-part steps stay eager beside the compiled one-part ones).

A program compiles once (some 35 s each for the tiny model on 2 cores) into the session's cache
(conftest: .pytest_cache/trimode-compiled, kept between runs): the default suite compiles only the
`last` program (prefills, AR steps); the `all` and `draft` programs are exercised by `slow` tests."""

from __future__ import annotations

import pytest
import torch

from trimode import LLM
from trimode.engine import compiled as compiled_module
from trimode.engine import model_runner
from trimode.engine.compiled import CompiledForward, _model_key, pass_kind
from trimode.engine.model_runner import ModelRunner
from trimode.forward import Forward
from trimode.model.transformer import ForwardContext, Part
from trimode.sampling_params import SamplingParams

PROMPTS = ["def main():\n    return", "import os", "class Foo(object):"]


@pytest.fixture(scope="module")
def compiled_runner(llm):
    return ModelRunner(llm.model, compile=True)


def _generate_outputs(llm, runner, prompts, params):
    eager, llm.runner = llm.runner, runner
    try:
        return llm.generate(prompts, params)
    finally:
        llm.runner = eager


def _generate(llm, runner, prompts, params):
    return [o.token_ids for o in _generate_outputs(llm, runner, prompts, params)]


def _same_tokens(llm, runner, prompts, mode, spec="linear"):
    params = SamplingParams(temperature=0.0, mode=mode, spec=spec, max_tokens=12, block_length=4, ignore_eos=True)
    assert _generate(llm, runner, prompts, params) == [o.token_ids for o in llm.generate(prompts, params)]


def test_compiled_ar_gives_the_eager_tokens_at_batch_1_and_3(llm, compiled_runner):
    """Prefills (T > 1, last position) and AR steps (T = 1) through one program, at a batch size
    the program was not traced at (it was traced at 2)."""
    for prompts in (PROMPTS[:1], PROMPTS):
        _same_tokens(llm, compiled_runner, prompts, "ar")
    assert set(compiled_runner.compiled.seconds) == {"last"}


def test_auto_runs_only_cached_programs(llm, compiled_runner, tmp_path):
    """`compile="auto"` loads what the cache holds and never compiles: a cold cache runs eager."""
    ar = Forward("ar", torch.zeros(1, 1, dtype=torch.long), True)
    verify = Forward("verify", torch.zeros(1, 4, dtype=torch.long), True)
    cold = CompiledForward(llm.model, cache_dir=tmp_path, build=False)
    assert not cold.takes(ar) and not list(tmp_path.iterdir())
    compiled_runner.compiled.takes(ar)  # compiled by the test above, or now
    warm = CompiledForward(llm.model, cache_dir=compiled_runner.compiled.cache_dir, build=False)
    assert warm.takes(ar) and pass_kind(verify, True) == "all"


def test_compiled_forwards_run_alone(llm, compiled_runner):
    """With programs loaded, AR rows do not ride beside another group's pass (that forward would
    run eager); eager forwards keep riding. Same tokens either way."""
    compiled_runner.compiled.takes(Forward("ar", torch.zeros(1, 1, dtype=torch.long), True))
    auto = ModelRunner(llm.model, compile="auto")  # loads the cached `last` program
    assert not auto.fuses_parts and llm.runner.fuses_parts
    sizes = []
    execute = auto.execute
    auto.execute = lambda parts: (sizes.append(len(parts)), execute(parts))[1]
    mixed = [
        SamplingParams(temperature=0.0, mode=m, max_tokens=8, block_length=4, ignore_eos=True)
        for m in ("ar", "selfspec")
    ]
    assert _generate(llm, auto, PROMPTS[:2], mixed) == [o.token_ids for o in llm.generate(PROMPTS[:2], mixed)]
    assert sizes and max(sizes) == 1


def test_a_program_is_keyed_by_its_weights(llm, llm_nolora):
    """Weights are frozen into a program, so other weights (here: no draft LoRA) get another."""
    assert _model_key(llm.model) != _model_key(llm_nolora.model)
    assert _model_key(llm.model) == _model_key(llm.model)


def test_a_compiled_forward_refuses_a_view_it_cannot_take(llm, compiled_runner):
    kv = llm.runner.new_cache(1, 32)
    positions, span = kv.begin(3)  # batch 1 on fresh pages: a `run` view, not gathered
    tokens = torch.zeros(1, 3, dtype=torch.long)
    part = Part(tokens, ForwardContext(positions, None, kv.view), torch.zeros(1, dtype=torch.long))
    fwd = Forward("prefill", tokens, True, logit_index=part.logit_index)
    assert compiled_runner.compiled.takes(fwd)
    with pytest.raises(ValueError, match="gather=True"):
        compiled_runner.compiled(part, fwd)


@pytest.mark.slow
@pytest.mark.parametrize("mode,spec", [("diffusion", "linear"), ("selfspec", "linear"), ("selfspec", "quadratic")])
def test_compiled_block_modes_give_the_eager_tokens_at_batch_1_and_3(llm, compiled_runner, mode, spec):
    """Quadratic self-spec's pass (per-token positions, its pattern as a dense mask, the draft LoRA
    per position) through the `draft` program."""
    for prompts in (PROMPTS[:1], PROMPTS):
        _same_tokens(llm, compiled_runner, prompts, mode, spec)


@pytest.mark.slow
def test_compiled_without_the_draft_lora_and_mixed_modes(llm, llm_nolora):
    spec = SamplingParams(temperature=0.0, mode="selfspec", max_tokens=12, block_length=4, ignore_eos=True)
    runner = ModelRunner(llm_nolora.model, compile=True)
    assert _generate(llm_nolora, runner, PROMPTS, spec) == [o.token_ids for o in llm_nolora.generate(PROMPTS, spec)]
    mixed = [
        SamplingParams(temperature=0.0, mode=m, max_tokens=10, block_length=4, ignore_eos=True)
        for m in ("ar", "diffusion", "selfspec")
    ]
    assert _generate(llm, ModelRunner(llm.model, compile=True), PROMPTS, mixed) == [
        o.token_ids for o in llm.generate(PROMPTS, mixed)
    ]


@pytest.mark.slow
def test_llm_compile_prepares_every_program_at_start(tiny_dir, capsys):
    llm = LLM(tiny_dir, dtype="float32", device="cpu", compile=True)
    assert set(llm.runner.compiled.seconds) == {"last", "all", "draft"}
    assert "compiled forwards ready" in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_bfloat16_agrees_with_eager_bfloat16(tiny_dir):
    """bf16 programs (their own cache entries) give eager bf16's first-token distribution to bf16
    rounding: inductor's GEMM template rounds differently from oneDNN's, so tokens may part later."""
    llm = LLM(tiny_dir, dtype="bfloat16", device="cpu", compile=False)
    runner = ModelRunner(llm.model, compile=True)
    assert runner.compiled is not None and "-bfloat16-" in runner.compiled.path("last").name
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    for ours, eager in zip(_generate_outputs(llm, runner, PROMPTS, params), llm.generate(PROMPTS, params)):
        (top,), (top_eager,) = ours.logprobs, eager.logprobs
        assert eager.token_ids[0] in top
        assert max(v.logprob for v in top.values()) == pytest.approx(
            max(v.logprob for v in top_eager.values()), abs=0.05
        )
    assert set(runner.compiled.seconds) == {"last"}


def test_an_unreadable_cached_program_runs_eager(llm, tmp_path, capsys):
    ar = Forward("ar", torch.zeros(1, 1, dtype=torch.long), True)
    compiled = CompiledForward(llm.model, cache_dir=tmp_path, build=False)
    compiled.path("last").write_bytes(b"not a program")
    assert not compiled.takes(ar)
    assert "cannot load" in capsys.readouterr().err


def test_a_pass_no_program_fits_runs_eager(llm, tmp_path):
    """Logits at one position with the draft LoRA on: no program has both, so it stays eager."""
    tokens = torch.zeros(2, 3, dtype=torch.long)
    odd = Forward("draft", tokens, False, True, logit_index=torch.zeros(2, dtype=torch.long))
    compiled = CompiledForward(llm.model, cache_dir=tmp_path, build=True)
    assert pass_kind(odd, True) is None and not compiled.takes(odd) and not list(tmp_path.iterdir())
    assert pass_kind(Forward("draft", tokens, False, True), True) == "draft"


def test_a_model_too_big_to_embed_is_refused_or_runs_eager(llm, monkeypatch):
    monkeypatch.setattr(compiled_module, "MAX_WEIGHT_BYTES", 1024)
    monkeypatch.setattr(model_runner, "MAX_WEIGHT_BYTES", 1024)
    with pytest.raises(ValueError, match="embed the weights"):
        ModelRunner(llm.model, compile=True)
    assert ModelRunner(llm.model, compile="auto").compiled is None
