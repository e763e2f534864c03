"""The Python API as vLLM code calls it: `generate(prompts, sampling_params=..., use_tqdm=...)`,
prompt dicts, `chat(messages, sampling_params=..., chat_template_kwargs=...)`, OpenAI message shapes,
and vLLM's output shape, beside trimode's own names."""

from __future__ import annotations

import pytest
from conftest import PROMPTS

from trimode import SamplingParams


def test_chat_honours_sampling_params_by_keyword(llm):
    """The silent drop: `chat(m, sampling_params=sp)` once fell into the template's keywords and
    decoded AR with the defaults."""
    sp = SamplingParams(temperature=0.0, mode="selfspec", max_tokens=2, ignore_eos=True)
    out = llm.chat([{"role": "user", "content": "hi"}], sampling_params=sp)[0]
    assert out.mode == "selfspec" and len(out.token_ids) == 2
    with pytest.raises(TypeError):
        llm.chat([{"role": "user", "content": "hi"}], sampling_param=sp)  # a misspelt name is an error


def test_generate_by_keyword_and_prompt_dicts(llm, capsys):
    sp = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    want = [o.token_ids for o in llm.generate(PROMPTS[:2], sp)]
    ids = llm.tokenizer.encode(PROMPTS[1])
    got = llm.generate([{"prompt": PROMPTS[0]}, {"prompt_token_ids": ids}], sampling_params=sp, use_tqdm=True)
    assert [o.token_ids for o in got] == want
    assert "2/2" in capsys.readouterr().err  # the progress bar
    assert llm.generate({"prompt": PROMPTS[0]}, params=sp)[0].token_ids == want[0]  # trimode's own name
    with pytest.raises(ValueError, match="not both"):
        llm.generate(PROMPTS[0], sampling_params=sp, params=sp)


def test_outputs_have_vllms_shape(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))[0]
    (completion,) = out.outputs
    assert (completion.index, completion.text, completion.token_ids) == (0, out.text, out.token_ids)
    assert completion.finish_reason == out.finish_reason == "length"
    assert completion.logprobs is None and out.prompt_logprobs is None  # not asked for


def test_openai_message_shapes_and_template_options(llm):
    """Text parts are the text joined by newlines; `developer` is the system turn; a template of
    one's own and its variables reach the render."""
    sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    plain = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a\nb"}]
    parts = [
        {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]
    assert llm.chat(parts, sp)[0].prompt_token_ids == llm.chat(plain, sp)[0].prompt_token_ids
    thinking = llm.chat(plain, sp, chat_template_kwargs={"enable_thinking": True})[0]
    assert thinking.prompt.endswith("<think>\n")
    own = "{% for m in messages %}[{{ m['role'] }}|{{ m['content'] }}]{% endfor %}{{ tools | length }}"
    out = llm.chat(plain, sp, chat_template=own, tools=[{"type": "function"}])[0]
    assert out.prompt == "[system|be brief][user|a\nb]1"
    with pytest.raises(ValueError, match="does not parse"):
        llm.chat(plain, sp, chat_template="{% for %}")


def test_vllm_constructor_arguments_run_unchanged():
    """A vLLM script's LLM(...) call: enforce_eager and seed mean what they mean there; the
    options that mean nothing here warn once each; a misspelt one is still a TypeError."""
    from trimode import LLM

    with pytest.warns(UserWarning, match="gpu_memory_utilization=...\\) is ignored"):
        a = LLM(gpu_memory_utilization=0.9, enforce_eager=True, seed=3, trust_remote_code=True, max_model_len=256)
    assert a.runner.compiled is None and a.max_model_len == 256
    b = LLM(enforce_eager=True, seed=3)
    sampled = SamplingParams(temperature=1.0, max_tokens=12)  # unseeded: the LLM's seed decides
    assert [o.token_ids for o in a.generate(PROMPTS, sampled)] == [o.token_ids for o in b.generate(PROMPTS, sampled)]
    with pytest.raises(TypeError, match="gpu_memory_utilisation"):
        LLM(gpu_memory_utilisation=0.9)


def test_vllm_output_fields(llm):
    assert llm.get_tokenizer() is llm.tokenizer
    first = llm.generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    then = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=3, logprobs=1), use_tqdm=False)[0]
    ids = [int(o.request_id) for o in first + [then]]
    assert ids == list(range(ids[0], ids[0] + 3)) and all(o.finished for o in first)
    (done,) = then.outputs
    assert done.cumulative_logprob == pytest.approx(sum(p[t].logprob for p, t in zip(then.logprobs, then.token_ids)))
    assert first[0].outputs[0].cumulative_logprob is None and first[0].outputs[0].stop_reason is None  # length
    text = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    by_string = llm.generate(
        PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, stop=[text.text[2:4]])
    )[0]
    assert by_string.outputs[0].stop_reason == text.text[2:4] and by_string.finish_reason == "stop"
    stop_id = text.token_ids[3]
    by_id = llm.generate(
        PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, stop_token_ids=[stop_id])
    )[0]
    assert by_id.outputs[0].stop_reason == stop_id and by_id.finish_reason == "stop"
