"""lm-evaluation-harness end to end against a live `trimode serve`, with its default completions
settings (token-id prompts, batches of prompts): a generate-until task in every mode (each answer
the offline engine's) and a multiple-choice task scored by loglikelihood (each score the offline
prompt logprobs' sum, to 1e-4). Tasks: tests/lm_eval/*.yaml over held-out sort examples."""

from __future__ import annotations

from pathlib import Path

import pytest
from live import MODEL, start_server

from trimode import LLM, SamplingParams
from trimode.llm import EMBEDDED_MODEL_DIR

lm_eval = pytest.importorskip("lm_eval")  # the `test` extra
pytestmark = pytest.mark.slow
TASKS = Path(__file__).parent / "lm_eval"


@pytest.fixture(scope="module")
def server():
    proc, url = start_server("--max-batch", "8")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def evaluate(url: str, task: str, **kwargs) -> dict:
    from lm_eval.tasks import TaskManager

    args = f"model={MODEL},base_url={url}/v1/completions,tokenizer={EMBEDDED_MODEL_DIR},tokenizer_backend=huggingface"
    return lm_eval.simple_evaluate(
        model="local-completions",
        model_args=args + ",num_concurrent=2,max_retries=1,tokenized_requests=True",
        tasks=[task],
        task_manager=TaskManager(include_path=str(TASKS)),
        log_samples=True,
        batch_size=4,
        **kwargs,
    )


@pytest.mark.parametrize("mode", ["ar", "diffusion", "selfspec"])
def test_generate_until_answers_are_the_offline_engines(server, mode):
    offline = LLM()
    result = evaluate(server, "trimode_sort", gen_kwargs=f"mode={mode}")
    samples = result["samples"]["trimode_sort"]
    params = SamplingParams(temperature=0.0, mode=mode, max_tokens=40, stop=["<|im_end|>"])
    prompts = [offline.tokenizer.encode(s["arguments"][0][0], add_special_tokens=False) for s in samples]
    want = [o.text for o in offline.generate(prompts, params)]
    assert [s["resps"][0][0] for s in samples] == want
    correct = sum(w.strip() == s["target"] for w, s in zip(want, samples)) / len(samples)
    assert result["results"]["trimode_sort"]["exact_match,none"] == pytest.approx(correct)


def test_loglikelihoods_are_the_offline_prompt_logprobs(server):
    offline = LLM()
    result = evaluate(server, "trimode_sort_choice")
    tok = offline.tokenizer
    for sample in result["samples"]["trimode_sort_choice"]:
        for (context, continuation), ((score, greedy),) in zip(sample["arguments"], sample["resps"]):
            ctx = tok.encode(context, add_special_tokens=False)
            full = tok.encode(context + continuation, add_special_tokens=False)
            out = offline.generate(full, SamplingParams(temperature=0.0, max_tokens=0, prompt_logprobs=1))[0]
            positions = out.prompt_logprobs[len(ctx) :]
            assert score == pytest.approx(sum(p[t].logprob for p, t in zip(positions, full[len(ctx) :])), abs=1e-4)
            assert greedy == all(p[t].rank == 1 for p, t in zip(positions, full[len(ctx) :]))
    assert result["results"]["trimode_sort_choice"]["acc,none"] > 0.5
