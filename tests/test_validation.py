"""Bad input: a ValueError naming the field and the allowed values; the CLI exits 2 without a traceback."""

from __future__ import annotations

import pytest
from run_cli import run_cli

from trimode import SamplingParams


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"block_length": 0}, "block_length"),
        ({"threshold": -0.01}, "threshold"),
        ({"threshold": 1.01}, "threshold"),
        ({"mode": "fast"}, "mode"),
        ({"mode": "selfspec", "spec": "cubic"}, "spec"),
        ({"spec": "quadratic"}, "spec='quadratic' is a kind of mode 'selfspec'"),
        ({"mode": "selfspec", "spec": "quadratic", "block_length": 1}, "block_length"),
        ({"stop": [""]}, "stop"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_sampling_params_reject_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field) as e:
        SamplingParams(**kwargs)
    if field == "mode":
        assert "ar, diffusion, selfspec" in str(e.value)


@pytest.mark.parametrize(
    "prompts,match",
    [
        ("", "prompt 0 is empty"),
        (["ok", ""], "prompt 1 is empty"),
        ([], "prompts must be"),
        ([[1, 2, 99999]], "outside"),
        ([["a"]], "prompt 0 must be"),
        ({"prompt": "a", "multi_modal_data": {}}, "keys \\['multi_modal_data', 'prompt'\\]: give exactly"),
        ([{"prompt_token_ids": "1 2"}], "prompt 0 is a dict"),
    ],
)
def test_bad_prompts(llm, prompts, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=2))


def test_prompt_longer_than_the_context(tiny_dir):
    from trimode import LLM

    small = LLM(tiny_dir, dtype="float32", max_model_len=16)
    with pytest.raises(ValueError, match="exceed the context of 16"):
        small.generate("x " * 40, SamplingParams(temperature=0.0, max_tokens=2))
    with pytest.raises(ValueError, match="max_tokens"):
        small.generate("x", SamplingParams(temperature=0.0, max_tokens=100))


def test_bad_chat_messages(llm):
    with pytest.raises(ValueError, match="message 0 must be a dict with a 'role'"):
        llm.chat([{"content": "no role"}])
    with pytest.raises(ValueError, match="role 'wizard'; use one of system, developer, user, assistant, tool"):
        llm.chat([{"role": "wizard", "content": "hi"}])
    with pytest.raises(ValueError, match="'image_url' are not supported .* send text parts"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(ValueError, match=r"fields trimode does not take: \['audio'\]"):
        llm.chat([{"role": "user", "content": "hi", "audio": None}])


def test_wrong_number_of_params(llm):
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        llm.generate(["a", "b", "c"], [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0)])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--max-tokens", "0"], "max_tokens"),
        (["--mode", "turbo"], "mode must be one of ar, diffusion, selfspec"),
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "2"], "top_p"),
        (["--block-length", "0"], "block_length"),
        (["--threshold", "3"], "threshold"),
    ],
)
def test_cli_bad_input_exits_2_without_traceback(tiny_dir, args, message, capsys):
    code, err = run_cli(["generate", "--model", str(tiny_dir), *args, "hi"], capsys)
    assert code == 2
    assert message in err and "Traceback" not in err


def test_cli_missing_model_dir(tmp_path, capsys):
    from trimode.cli import main

    assert main(["generate", "--model", str(tmp_path / "nope"), "hi"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--kv-cache-tokens", "--kv-page-size", "--max-connections"])
def test_serve_refuses_non_positive_sizes_by_flag_name(flag, capsys):
    code, err = run_cli(["serve", flag, "0"], capsys)
    assert code == 2 and f"{flag} must be > 0; got 0" in err
