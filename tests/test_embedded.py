"""The embedded model: loaded with no arguments, real tri-mode behaviour on held-out tasks."""

from __future__ import annotations

import pytest

from trimode import LLM, SamplingParams
from trimode.tasks import TASKS, held_out


@pytest.fixture(scope="module")
def embedded():
    return LLM()


def test_loaded_by_default_and_small(embedded):
    from trimode.llm import EMBEDDED_MODEL_DIR

    size = sum(p.stat().st_size for p in EMBEDDED_MODEL_DIR.iterdir())
    assert size <= 25 * 2**20
    assert (EMBEDDED_MODEL_DIR / "REPRODUCE.md").is_file()
    assert embedded.config.num_hidden_layers == 8


def test_modes_on_held_out_tasks(embedded):
    examples = [e for t in TASKS for e in held_out(t, 6)]
    convs = [e.messages() for e in examples]
    ar = embedded.chat(convs, SamplingParams(temperature=0.0, mode="ar", max_tokens=40))
    spec = embedded.chat(convs, SamplingParams(temperature=0.0, mode="selfspec", max_tokens=40))
    diff = embedded.chat(convs, SamplingParams(temperature=0.0, mode="diffusion", max_tokens=40))
    assert [o.token_ids for o in spec] == [o.token_ids for o in ar]  # selfspec greedy == AR greedy
    assert sum(e.is_correct(o.text) for e, o in zip(examples, ar)) >= 0.8 * len(examples)
    assert sum(e.is_correct(o.text) for e, o in zip(examples, diff)) >= 0.7 * len(examples)
    tpf = lambda outs: sum(o.num_generated_tokens for o in outs) / sum(o.num_forwards for o in outs)  # noqa: E731
    assert tpf(spec) > 1.5 and tpf(diff) > 1.5


@pytest.mark.parametrize("block_length", [2, 4, 8, 16])
def test_quadratic_selfspec_gives_ar_tokens_in_fewer_forwards(embedded, block_length):
    """Batched (rows finishing at EOS mid-pass, at different steps) and alone."""
    convs = [e.messages() for t in TASKS for e in held_out(t, 2)]
    ar = embedded.chat(convs, SamplingParams(temperature=0.0, mode="ar", max_tokens=40))
    params = SamplingParams(
        temperature=0.0, mode="selfspec", spec="quadratic", block_length=block_length, max_tokens=40
    )
    quadratic = embedded.chat(convs, params)
    assert [o.token_ids for o in quadratic] == [o.token_ids for o in ar]
    assert embedded.chat(convs[:1], params)[0].token_ids == ar[0].token_ids
    assert sum(o.num_forwards for o in quadratic) < sum(o.num_forwards for o in ar)


def test_cli_without_model_uses_it(capsys):
    from trimode.cli import main

    assert main(["generate", "--chat", "--mode", "selfspec", "Copy: 4 8 15 16 23 42"]) == 0
    assert capsys.readouterr().out.strip() == "4 8 15 16 23 42"
