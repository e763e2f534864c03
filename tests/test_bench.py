"""The benchmark harness: suites, percentiles, accounting, and a full run on a tiny checkpoint."""

from __future__ import annotations

import json
import math

import pytest
from conftest import fake_output
from run_cli import run_cli

from trimode.bench import runner
from trimode.bench.metrics import percentile
from trimode.bench.runner import BenchConfig, expand_configs, sweep
from trimode.bench.suites import (
    CONTINUATION,
    RECALL,
    BenchPrompt,
    jsonl_suite,
    load_suite,
    long_suite,
    parse_length,
    task_suite,
)


def test_percentiles_on_known_inputs():
    xs = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert percentile(xs, 50) == 3.0 and percentile(xs, 0) == 1.0 and percentile(xs, 100) == 5.0
    assert percentile(xs, 90) == pytest.approx(4.6) and percentile(xs, 99) == pytest.approx(4.96)
    assert percentile([7.0], 99) == 7.0 and math.isnan(percentile([], 50))
    assert percentile([3.0, float("nan"), 1.0], 50) == 2.0


def test_accuracy_checker():
    ex = task_suite(5)
    assert {p.category for p in ex} == {"copy", "reverse", "sort", "add", "recall"}
    for p in ex:
        assert p.is_correct(p.answer) and not p.is_correct(p.answer + " 1")
    free = BenchPrompt(id="1", category="qa", prompt="2+2=", answer="4")
    assert free.is_correct(" 4\n") and not free.is_correct("5")
    assert BenchPrompt(id="2", category="code", prompt="def").is_correct("anything") is None


@pytest.mark.parametrize(
    "line,message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"id": 1}', "exactly one of `prompt`"),
        ('{"prompt": "a", "messages": []}', "exactly one of `prompt`"),
        ('{"prompt": ""}', "non-empty string"),
        ('{"messages": [{"role": "user"}]}', "`messages` must be"),
        ('{"prompt": "a", "answer": 4}', "`answer` must be a string"),
        ('{"prompt": "a", "max_tokens": 0}', "`max_tokens`"),
    ],
)
def test_jsonl_suite_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "suite.jsonl"
    path.write_text('{"id": "ok", "category": "math", "prompt": "1+1=", "answer": "2"}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"suite.jsonl:3: .*{message}"):
        jsonl_suite(path)


def test_jsonl_suite_loads(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(
        '{"id": "a", "category": "gsm", "messages": [{"role": "user", "content": "1+1?"}], '
        '"answer": "2", "max_tokens": 8}\n{"prompt": "def f():"}\n'
    )
    a, b = load_suite(str(path), 10)
    assert a.category == "gsm" and a.max_tokens == 8 and a.chat() == [{"role": "user", "content": "1+1?"}]
    assert b.prompt == "def f():" and b.answer is None
    with pytest.raises(ValueError, match="--suite"):
        load_suite("nope", 3)


class FakeLLM:
    """Every request takes exactly 1 prefill + 2 forwards per 3 tokens: TPF is known in advance."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.calls = 0

    def generate(self, prompts, params, use_tqdm=False):
        self.calls += 1
        outs = []
        for p, sp in zip(prompts, params):
            n = sp.max_tokens
            outs.append(
                fake_output(
                    p,
                    sp.mode,
                    n,
                    1 + 2 * math.ceil((n - 1) / 3),
                    seconds=0.01,
                    mode_stats={"tokens_per_cycle": [3] * 3},
                    forward_ms={"draft": 1.0, "verify": 2.0},
                )
            )
        return outs


def test_tokens_per_forward_accounting_on_a_fake_model(llm, monkeypatch):
    fake = FakeLLM(llm.tokenizer)
    prompts = [BenchPrompt(id=str(i), category="c", prompt="p") for i in range(6)]
    ids = [[1, 2]] * 6
    monkeypatch.setattr(runner, "encode", lambda _, p: ids)
    result = sweep(
        fake, prompts, [BenchConfig("selfspec", 4, 8)], max_tokens=10, warmup=1, show_progress=False
    ).results[0]
    assert fake.calls == 1 + 2  # one warm-up batch, then 6 prompts in batches of 4 and 2
    assert result["num_generated_tokens"] == 60 and result["num_forwards"] == 6 * 7
    assert result["tokens_per_forward"] == pytest.approx(60 / 42, abs=1e-4)
    assert result["tokens_per_cycle"] == 3.0 and result["acceptance_histogram"] == {3: 18}
    assert result["ttft_ms"]["p50"] == pytest.approx(1.0) and result["itl_ms"]["p99"] == pytest.approx(1.0)
    assert result["forward_ms"] == {"draft": 1.0, "verify": 2.0} and result["accuracy"] is None


def test_expand_configs():
    cfgs = expand_configs(["ar", "diffusion", "selfspec"], [1, 4], [8, 32], [0.5, 0.9])
    assert len(cfgs) == 2 * (1 + 4 + 2)
    assert BenchConfig("diffusion", 4, 32, 0.5) in cfgs and BenchConfig("ar", 1) in cfgs
    kinds = expand_configs(["ar", "selfspec"], [1], [4, 8], [0.9], specs=["linear", "quadratic"])
    assert [c.label for c in kinds] == [
        "ar bs1",
        "selfspec bs1 B4",
        "selfspec bs1 B4 quadratic",
        "selfspec bs1 B8",
        "selfspec bs1 B8 quadratic",
    ]


def test_endpoint_configs_send_each_mode_its_own_fields():
    from trimode.bench.endpoint import EndpointConfig, endpoint_configs, request_body
    from trimode.bench.suites import task_suite

    cfgs = endpoint_configs(["ar", "selfspec", "auto"], [1], [16], [None], ["quadratic"])
    assert [c.label for c in cfgs] == ["ar c1", "selfspec c1 B16 quadratic", "auto c1"]
    _, body = request_body(task_suite(1)[0], "m", EndpointConfig("auto", 1, 16), "auto", 8, 0)
    assert body["mode"] == "auto" and "block_length" not in body and "spec" not in body
    (mix,) = endpoint_configs(["diffusion+auto"], [4], [16], [0.9])
    assert mix.label == "diffusion+auto c4 B16 t0.9"
    assert [mix.request_mode(k) for k in range(4)] == ["diffusion", "auto", "diffusion", "auto"]
    with pytest.raises(ValueError, match="diffusion\\+auto"):
        endpoint_configs(["diffusion+fast"], [4], [None], [None])


def test_speedup_is_measured_against_ar_in_the_same_run(llm):
    prompts = task_suite(2)
    results = sweep(
        llm, prompts, expand_configs(["ar", "selfspec"], [1], [8], [0.9]), 6, 0, show_progress=False
    ).results
    ar, spec = results
    assert ar["speedup_vs_ar"] == 1.0
    assert spec["speedup_vs_ar"] == pytest.approx(spec["output_tokens_per_s"] / ar["output_tokens_per_s"], rel=1e-2)


def test_bench_cli_on_a_tiny_checkpoint_writes_every_field(tiny_dir, tmp_path):
    out = tmp_path / "bench"
    from trimode.cli import main

    status = main(
        [
            "bench",
            "--model",
            str(tiny_dir),
            "--num-prompts",
            "2",
            "--batch-sizes",
            "1,2",
            "--block-lengths",
            "4",
            "--max-tokens",
            "6",
            "--baseline",
            "hf",
            "--out",
            str(out),
            "--dtype",
            "float32",
            "--repeats",
            "2",
        ]
    )
    assert status == 0
    doc = json.loads((out / "results.json").read_text())
    assert {"command", "versions", "machine", "suite", "num_prompts", "results", "baselines", "plots"} <= doc.keys()
    assert {"device", "dtype", "threads", "parameters", "weight_bytes"} <= doc["machine"].keys()
    card = doc["machine"]
    assert card["cpu_isa"] and card["cpu_auto_dtype"] and card["peak_bandwidth_source"].startswith("measured")
    assert card["ar_step_speed_of_light_ms"] == pytest.approx(  # the card rounds to 0.1 us
        1000 * card["ar_step_bytes"] / card["peak_bandwidth_bytes_per_s"], abs=1e-4
    )
    embed = 1024 * 64 * 4  # the tiny model's fp32 input embedding: an AR step reads one of its rows
    assert card["ar_step_bytes"] == card["weight_bytes"] - embed + 64 * 4
    assert "## AR steps against the speed of light" in (out / "report.md").read_text()
    assert len(doc["results"]) == 2 * 3 + 2 and doc["num_prompts"] == 2 and doc["repeats"] == 2
    control = [r for r in doc["results"] if r.get("control")]
    assert [(r["mode"], r["batch_size"]) for r in control] == [("ar", 1)]  # the A/A control
    (hf,) = [r for r in doc["results"] if r["engine"] == "hf"]  # the baseline, interleaved with the rest
    ci = doc["baselines"][0]["speed_ratio_ci"]
    assert (
        hf["batch_size"] == 1
        and ci["lo"] <= ci["median"] <= ci["hi"]
        and hf["accuracy"] == doc["baselines"][0]["accuracy"]
    )
    assert isinstance(doc["warnings"], list) and "## Checks" in (out / "report.md").read_text()
    assert {len(v) for v in doc["samples"].values()} == {2 * 2, 2 * 1}  # (batches, repeats) per batch size
    assert all({"lo", "median", "hi"} == r["output_tokens_per_s_ci"].keys() for r in doc["results"])
    fields = {
        "mode",
        "batch_size",
        "output_tokens_per_s",
        "requests_per_s",
        "ttft_ms",
        "itl_ms",
        "tokens_per_forward",
        "forward_ms",
        "accuracy",
        "speedup_vs_ar",
        "num_generated_tokens",
    }
    for r in doc["results"]:
        assert fields <= r.keys()
        assert {"p50", "p90", "p99"} == r["ttft_ms"].keys()
    spec = [r for r in doc["results"] if r["mode"] == "selfspec"]
    assert all("tokens_per_cycle" in r and r["acceptance_histogram"] for r in spec)
    assert all("denoise_passes_per_block" in r for r in doc["results"] if r["mode"] == "diffusion")
    assert doc["baselines"][0]["identical_outputs"] == 1.0  # same weights, greedy: token for token
    for name in doc["plots"]:
        assert (out / name).stat().st_size > 1000
    assert (out / "report.md").read_text().startswith("# trimode bench")


def test_bench_sweeps_dtypes_interleaved_each_with_its_baseline(tiny_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "--model", str(tiny_dir), "--modes", "ar,selfspec", "--batch-sizes", "1", "--block-lengths", "8"]
    args += ["--num-prompts", "2", "--max-tokens", "4", "--repeats", "2", "--baseline", "hf"]
    code, err = run_cli([*args, "--dtype", "float32,bfloat16", "--out", str(out)], capsys)
    assert code == 0, err
    doc = json.loads((out / "results.json").read_text())
    assert doc["dtypes"]["bfloat16"]["weight_bytes"] * 2 == doc["dtypes"]["float32"]["weight_bytes"]
    for dtype, card in doc["dtypes"].items():
        assert card["dtype"] == dtype and card["ar_step_speed_of_light_ms"] > 0
        mine = {r["label"]: r for r in doc["results"] if r["dtype"] == dtype and not r.get("control")}
        assert mine.keys() == {f"ar bs1 {dtype}", f"selfspec bs1 B8 {dtype}", f"hf bs1 {dtype}"}
        spec = mine[f"selfspec bs1 B8 {dtype}"]  # its speed-up is over AR in the same dtype
        assert spec["speedup_vs_ar"] == pytest.approx(
            spec["output_tokens_per_s"] / mine[f"ar bs1 {dtype}"]["output_tokens_per_s"], rel=0.01, abs=1e-3
        )
    assert [b["dtype"] for b in doc["baselines"]] == ["float32", "bfloat16"]
    assert doc["baselines"][0]["identical_outputs"] == 1.0  # same weights in fp32, greedy
    report = (out / "report.md").read_text()
    assert "## Block passes in AR steps" in report and "| selfspec bs1 B8 bfloat16 | draft " in report
    assert "## Hugging Face baseline, bfloat16" in report
    code, err = run_cli([*args, "--dtype", "float32,float32"], capsys)
    assert code == 2 and "distinct dtypes" in err


def test_bench_bad_flags_exit_2(capsys):
    bad = (
        ["--batch-sizes", "1,x"],
        ["--modes", "fast"],
        ["--thresholds", "2"],
        ["--suite", "none"],
        ["--repeats", "-1"],
    )
    for args in bad:
        code, err = run_cli(["bench", *args], capsys)
        assert code == 2 and "Traceback" not in err and "error" in err, err
    code, err = run_cli(["bench", "--endpoint", "http://127.0.0.1:9/v1", "--min-seconds", "2"], capsys)
    assert code == 2 and "--min-seconds is for the offline bench" in err


def test_any_hugging_face_causal_lm_directory_is_a_baseline(tiny_dir, tmp_path, capsys):
    """`--baseline hf:PATH`: a tiny random Llama written here, with a tokenizer and chat template of
    its own, runs interleaved with the sweep; its speed ratio has an interval and its accuracy sits
    beside trimode's, and tokens are not compared (another model)."""
    import shutil
    from pathlib import Path

    import torch
    import transformers

    import trimode

    hf_dir = tmp_path / "tiny-llama"
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=4096,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=11,
        pad_token_id=3,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(hf_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(trimode.__file__).parent / "embedded" / name, hf_dir)
    out = tmp_path / "bench"
    args = ["--model", str(tiny_dir), "--modes", "ar", "--batch-sizes", "1", "--num-prompts", "2"]
    args += ["--max-tokens", "4", "--repeats", "2", "--dtype", "float32", "--baseline", f"hf:{hf_dir}"]
    code, err = run_cli(["bench", *args, "--out", str(out)], capsys)
    assert code == 0, err
    doc = json.loads((out / "results.json").read_text())
    base = doc["baselines"][0]
    assert base["engine"] == f"hf:{hf_dir}" and "identical_outputs" not in base
    assert base["speed_ratio_ci"]["lo"] <= base["speed_ratio_ci"]["median"] <= base["speed_ratio_ci"]["hi"]
    assert {"accuracy", "trimode_ar_accuracy"} <= base.keys()
    (theirs,) = [r for r in doc["results"] if r["engine"] != "trimode"]
    assert theirs["label"] == "hf:tiny-llama bs1" and theirs["num_generated_tokens"] > 0
    code, err = run_cli(["bench", *args[:-1], f"hf:{tmp_path / 'none'}"], capsys)
    assert code == 2 and "config.json" in err


def test_long_suite_prompts_have_the_asked_lengths_and_checkable_answers(llm):
    tok = llm.tokenizer
    prompts = long_suite(tok, [64, 200, 2048], 3, depth=0.25)
    assert [p.context_length for p in prompts] == [64] * 3 + [200] * 3 + [2048] * 3
    assert len({p.prompt for p in prompts}) == len(prompts)  # windows from different places
    for p in prompts:
        assert len(tok.encode(p.prompt)) == p.context_length, p.id  # BOS included
    recall = [p for p in prompts if p.category == RECALL]
    assert len(recall) == 6 and all(p.category == CONTINUATION and p.answer is None for p in prompts[1::3])
    for p in recall:
        name = p.prompt.rsplit("\nassert ", 1)[1].removesuffix(" ==")
        needle = f"\n{name} = {p.answer}\n"
        assert p.prompt.count(needle) == 1 and p.prompt.endswith(f"assert {name} ==")
        if p.context_length == 2048:  # the key sits a quarter of the way into the context
            assert len(tok.encode(p.prompt[: p.prompt.index(needle)])) / 2048 == pytest.approx(0.25, abs=0.03)
        assert p.is_correct(f" {p.answer}\n\ndef f():") is True
        assert p.is_correct(f" {int(p.answer) + 1}") is False and p.is_correct(f" x = {p.answer}") is False
    assert prompts[1].is_correct("anything") is None
    assert [parse_length(x) for x in ("512", "4k", "32K")] == [512, 4096, 32768]
    for bad in ("abc", "1.5k", "10"):
        with pytest.raises(ValueError, match="context length"):
            parse_length(bad)
    with pytest.raises(ValueError, match="--depth"):
        long_suite(tok, [64], 1, depth=1.5)


def test_bench_long_suite_reports_each_mode_at_each_context_length(tiny_dir, tmp_path, capsys):
    out = tmp_path / "long"
    args = ["bench", "--model", str(tiny_dir), "--dtype", "float32", "--suite", "long", "--context-lengths"]
    args += ["96,160", "--modes", "ar,selfspec", "--batch-sizes", "1", "--block-lengths", "4", "--num-prompts", "2"]
    args += ["--spec", "linear,quadratic"]
    code, err = run_cli([*args, "--max-tokens", "4", "--repeats", "2", "--warmup", "0", "--out", str(out)], capsys)
    assert code == 0, err
    doc = json.loads((out / "results.json").read_text())
    assert doc["context_lengths"] == [96, 160] and doc["depth"] == 0.5 and doc["num_prompts"] == 4
    by_label = {r["label"]: r for r in doc["results"]}
    assert {"ar bs1 ctx96", "selfspec bs1 B4 ctx96", "ar bs1 ctx160", "selfspec bs1 B4 ctx160"} < by_label.keys()
    assert by_label["selfspec bs1 B4 quadratic ctx96"]["spec"] == "quadratic"
    for n in (96, 160):
        ar, spec = by_label[f"ar bs1 ctx{n}"], by_label[f"selfspec bs1 B4 ctx{n}"]
        assert ar["num_requests"] == 2 * 2 and ar["num_checked"] == 2 * 1  # per repeat: one recall prompt
        assert ar["speedup_vs_ar"] == 1.0  # the reference at its own length
        ratio = spec["output_tokens_per_s"] / ar["output_tokens_per_s"]
        assert spec["speedup_vs_ar"] == pytest.approx(ratio, rel=1e-2)
    assert "long_context.png" in doc["plots"] and "context lengths 96, 160" in (out / "report.md").read_text()


def test_bench_long_suite_flags_are_checked(tiny_dir, capsys):
    cases = (
        (["--context-lengths", "1k"], "are for --suite long"),
        (["--suite", "long", "--context-lengths", "1k,x"], "context length"),
        (["--suite", "long", "--context-lengths", "100000k"], "exceeds the model's"),
        (["--suite", "long", "--endpoint", "http://127.0.0.1:9/v1"], "offline bench"),
        (["--modes", "selfspec", "--spec", "linear,cubic"], "--spec must list some of linear, quadratic"),
    )
    for extra, message in cases:
        code, err = run_cli(["bench", "--model", str(tiny_dir), "--dtype", "float32", *extra], capsys)
        assert code == 2 and message in err and "Traceback" not in err, err


def test_the_cpu_card_measures_bandwidth_once(tmp_path, monkeypatch):
    from trimode.bench import machine

    # A real probe, small: any machine reads more than 100 MB/s.
    assert machine.measure_read_bandwidth(num_bytes=32 * 2**20, runs=2) > 1e8
    calls = []
    monkeypatch.setattr(machine, "measure_read_bandwidth", lambda: calls.append(1) or 12.5e9)
    cache = tmp_path / "bandwidth.json"
    assert machine.cpu_read_bandwidth(cache) == 12.5e9 == machine.cpu_read_bandwidth(cache)
    assert len(calls) == 1 and len(json.loads(cache.read_text())) == 1
