"""The server, live on 127.0.0.1, driven by the official openai client and raw HTTP."""

from __future__ import annotations

import concurrent.futures
import json
import re
import time

import httpx
import pytest
from live import MODEL, metric, start_server

from trimode import LLM, SamplingParams
from trimode.llm import EMBEDDED_MODEL_DIR

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server():
    # The model as `vllm serve` takes it (positional), under two names, seeding unseeded requests.
    flags = (str(EMBEDDED_MODEL_DIR), "--served-model-name", MODEL, "alias", "--seed", "0")
    proc, url = start_server(*flags, "--max-batch", "32")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def offline():
    return LLM()


CHAT = [{"role": "user", "content": "Reverse: 12 7 33 4"}]


@pytest.mark.parametrize("mode", ["ar", "diffusion", "selfspec"])
def test_chat_and_completion_equal_offline(client, offline, mode):
    params = SamplingParams(temperature=0.0, mode=mode, max_tokens=24)
    want_chat = offline.chat(CHAT, params)[0]
    r = client.chat.completions.create(
        model=MODEL, messages=CHAT, temperature=0, max_tokens=24, extra_body={"mode": mode}
    )
    assert r.choices[0].message.content == want_chat.text
    assert r.choices[0].finish_reason == want_chat.finish_reason
    assert r.usage.completion_tokens == want_chat.num_generated_tokens
    usage = r.usage.model_dump()
    assert usage["num_forwards"] == want_chat.num_forwards and usage["tokens_per_forward"] > 0
    want = offline.generate("def parse(line):", params)[0]
    stream = client.completions.create(
        model=MODEL,
        prompt="def parse(line):",
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"mode": mode},
    )
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert text == want.text and finish == want.finish_reason
    assert usage is not None and usage.completion_tokens == want.num_generated_tokens


def test_quadratic_selfspec_is_asked_for_by_spec(client, offline, server):
    """`spec` beside `mode`: quadratic self-spec gives AR's greedy text in one forward per cycle; a
    spec without selfspec, or a pass wider than the server's step budget, is a 400 naming why."""
    want = offline.chat(CHAT, SamplingParams(temperature=0.0, max_tokens=24))[0]
    body = {"mode": "selfspec", "spec": "quadratic", "block_length": 4}
    r = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=24, extra_body=body)
    assert r.choices[0].message.content == want.text
    assert r.usage.model_dump()["num_forwards"] < want.num_forwards
    for extra, why in (
        ({"spec": "quadratic"}, "is a kind of mode 'selfspec'"),
        ({"mode": "selfspec", "spec": "quadratic"}, "feeds 1056 tokens per row per pass, more than .* of 512"),
        ({"mode": "selfspec", "spec": "square"}, "spec"),
    ):
        bad = httpx.post(f"{server}/v1/chat/completions", json={"model": MODEL, "messages": CHAT, **extra})
        assert bad.status_code == 400 and re.search(why, bad.text), bad.text


def test_auto_mode_gives_ar_text_and_says_which_decodings_served_it(client, offline, server):
    want = offline.chat(CHAT, SamplingParams(temperature=0.0, max_tokens=24))[0]
    r = client.chat.completions.create(
        model=MODEL, messages=CHAT, temperature=0, max_tokens=24, extra_body={"mode": "auto"}
    )
    assert r.choices[0].message.content == want.text
    served = r.usage.model_dump()["decodings"]
    assert served and sum(served.values()) <= r.usage.model_dump()["num_forwards"]
    assert "trimode_auto_cycles_total" in httpx.get(f"{server}/metrics").text


def test_bench_over_http_sends_spec(server, offline, tmp_path):
    from trimode.cli import main

    out = tmp_path / "http"
    args = ["bench", "--endpoint", server + "/v1", "--modes", "selfspec", "--spec", "quadratic"]
    args += ["--block-lengths", "4", "--concurrency", "1", "--num-prompts", "2", "--max-tokens", "16"]
    assert main([*args, "--warmup", "0", "--repeats", "2", "--out", str(out)]) == 0
    (spec,) = [r for r in json.loads((out / "results.json").read_text())["results"] if not r["control"]]
    assert spec["label"] == "selfspec c1 B4 quadratic" and spec["num_failed"] == 0
    from trimode.bench.runner import encode
    from trimode.bench.suites import task_suite

    params = SamplingParams(temperature=0.0, mode="selfspec", spec="quadratic", block_length=4, max_tokens=16, seed=0)
    outs = offline.generate(encode(offline, task_suite(2)), params)
    tokens, forwards = sum(len(o.token_ids) for o in outs), sum(o.num_forwards for o in outs)
    assert spec["tokens_per_forward"] == round(tokens / forwards, 4)


def test_the_request_shapes_clients_send(client, offline):
    """Token-id prompts and prompt lists (lm-evaluation-harness's defaults), streamed or not, one
    choice per prompt in order; text already rendered by a chat template, sent without a second
    BOS; content parts and the developer role; fields SDKs always send, accepted and ignored."""
    params = SamplingParams(temperature=0.0, max_tokens=8)
    texts = ["def parse(line):", "import os"]
    want = [o.text for o in offline.generate(texts, params)]
    ids = [offline.tokenizer.encode(t) for t in texts]
    r = client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=8)
    assert [c.index for c in r.choices] == [0, 1] and [c.text for c in r.choices] == want
    assert r.usage.prompt_tokens == sum(len(i) for i in ids)
    stream = client.completions.create(model=MODEL, prompt=texts, temperature=0, max_tokens=8, stream=True)
    streamed = ["", ""]
    for chunk in stream:
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == want
    with pytest.raises(openai.BadRequestError, match="prompt 1 has token ids outside"):
        client.completions.create(model=MODEL, prompt=[ids[0], [10**9]], max_tokens=8)
    chat = offline.chat(CHAT, params)[0]
    rendered = offline.tokenizer.apply_chat_template(CHAT)  # starts with the template's BOS
    r = client.completions.create(
        model=MODEL, prompt=rendered, temperature=0, max_tokens=8, extra_body={"add_special_tokens": False}
    )
    assert r.choices[0].text == chat.text and r.usage.prompt_tokens == chat.num_prompt_tokens
    plain = [{"role": "system", "content": "Be brief."}, *CHAT]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]  # rendered in the system turn
    parts = [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": CHAT[0]["content"]}]},
    ]
    r = client.chat.completions.create(
        model=MODEL,
        messages=parts,
        temperature=0,
        max_tokens=8,
        stop=[f"never{i}" for i in range(10)],
        store=False,
        metadata={"run": "test"},
        response_format={"type": "text"},  # the default: no structure
        tools=tools,
        tool_choice="auto",
        parallel_tool_calls=False,
    )
    assert r.choices[0].message.content == offline.chat(plain, params, tools=tools)[0].text
    r = client.completions.create(model="alias", prompt=texts[0], temperature=0, max_tokens=8)
    assert r.choices[0].text == want[0] and r.model == MODEL


def test_logprobs_in_both_shapes_and_lm_eval_scoring(client, offline):
    """Completions: tokens, token_logprobs, top_logprobs, text_offset, streamed or not; echo with
    max_tokens 0 over token-id prompts, as lm-evaluation-harness scores a continuation; chat's
    content list. Every number is the offline engine's."""
    want = offline.generate("def parse(line):", SamplingParams(temperature=0.0, max_tokens=6, logprobs=2))[0]
    r = client.completions.create(model=MODEL, prompt="def parse(line):", temperature=0, max_tokens=6, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.tokens == [offline.tokenizer.decode_token(t) for t in want.token_ids]
    assert lp.token_logprobs == pytest.approx([p[t].logprob for p, t in zip(want.logprobs, want.token_ids)])
    assert all(len(top) == 2 for top in lp.top_logprobs) and lp.text_offset == sorted(lp.text_offset)
    stream = client.completions.create(
        model=MODEL, prompt="def parse(line):", temperature=0, max_tokens=6, logprobs=2, stream=True
    )
    streamed = [x for chunk in stream for c in chunk.choices if c.logprobs for x in c.logprobs.token_logprobs]
    assert streamed == pytest.approx(lp.token_logprobs)
    ids = [offline.tokenizer.encode(t) for t in ("import os", "class Foo:")]
    scored = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    for choice, prompt in zip(scored.choices, ids):
        offline_lp = offline.generate(prompt, SamplingParams(temperature=0.0, max_tokens=0, prompt_logprobs=1))[
            0
        ].prompt_logprobs
        assert choice.logprobs.token_logprobs[0] is None and len(choice.logprobs.token_logprobs) == len(prompt)
        assert choice.logprobs.token_logprobs[1:] == pytest.approx(
            [p[t].logprob for p, t in zip(offline_lp[1:], prompt[1:])], abs=1e-4
        )  # batched beside the other prompt on the server, alone offline: float rounding
        assert choice.text == offline.tokenizer.decode(prompt)
    with pytest.raises(openai.BadRequestError, match="max_tokens 0 only scores a prompt"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)
    chat = offline.chat(CHAT, SamplingParams(temperature=0.0, max_tokens=6, logprobs=3))[0]
    r = client.chat.completions.create(
        model=MODEL, messages=CHAT, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([p[t].logprob for p, t in zip(chat.logprobs, chat.token_ids)])
    assert all(len(c.top_logprobs) == 3 and c.bytes == list(c.token.encode()) for c in content)
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3, stream=True
    )
    streamed = [c for chunk in stream for ch in chunk.choices if ch.logprobs for c in ch.logprobs.content]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]


def test_n_and_penalties_through_the_client(client, offline):
    """n=3 seeded samples are the offline engine's; every control reaches the engine (the offline
    engine's text under it), and self-spec still emits what AR does under it at temperature 0. The
    trained model copies too surely for a presence penalty of 2 to change this answer; the others do."""
    r = client.completions.create(model=MODEL, prompt="def parse(line):", max_tokens=8, n=3, seed=4, temperature=1.0)
    want = offline.generate("def parse(line):", SamplingParams(max_tokens=8, n=3, seed=4, temperature=1.0))[0]
    assert [c.index for c in r.choices] == [0, 1, 2] and [c.text for c in r.choices] == [o.text for o in want.outputs]
    repeat = [{"role": "user", "content": "Copy: 7 7 7 7 7 7 7 7"}]  # penalties fight the copy
    plain = client.chat.completions.create(model=MODEL, messages=repeat, temperature=0, max_tokens=24)
    seven = offline.tokenizer.encode("7", add_special_tokens=False)[0]
    controls = [
        ({"presence_penalty": 2.0}, {"presence_penalty": 2.0}),
        ({"frequency_penalty": 2.0}, {"frequency_penalty": 2.0}),
        ({"logit_bias": {str(seven): -100}}, {"logit_bias": {seven: -100}}),
        ({"extra_body": {"repetition_penalty": 3.0}}, {"repetition_penalty": 3.0}),
    ]
    for control, offline_control in controls:
        texts = {}
        for mode in ("ar", "selfspec"):
            extra = {**control.get("extra_body", {}), "mode": mode}
            fields = {k: v for k, v in control.items() if k != "extra_body"}
            r = client.chat.completions.create(
                model=MODEL, messages=repeat, temperature=0, max_tokens=24, extra_body=extra, **fields
            )
            texts[mode] = r.choices[0].message.content
        want = offline.chat(repeat, SamplingParams(**{"temperature": 0.0, "max_tokens": 24, **offline_control}))[0].text
        assert texts["ar"] == texts["selfspec"] == want, control
        assert "presence_penalty" in control or want != plain.choices[0].message.content


def test_structured_output_through_the_client(client, offline):
    """response_format json_schema parses and validates, as the offline engine wrote it, in AR and
    self-spec; vLLM's guided_choice; diffusion refused by name."""
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    structured = SamplingParams(temperature=0.0, max_tokens=48, structured={"json": schema})
    want = offline.generate("def parse(line):", structured)[0].text
    doc = json.loads(want)
    assert set(doc) == {"name", "age"} and isinstance(doc["age"], int)
    for mode in ("ar", "selfspec"):
        r = client.chat.completions.create(
            model=MODEL, messages=CHAT, temperature=0, max_tokens=48, response_format=fmt, extra_body={"mode": mode}
        )
        assert r.choices[0].message.content == offline.chat(CHAT, structured)[0].text
        r = client.completions.create(
            model=MODEL,
            prompt="def parse(line):",
            temperature=0,
            max_tokens=48,
            extra_body={"guided_json": schema, "mode": mode},
        )
        assert r.choices[0].text == want
    r = client.completions.create(
        model=MODEL, prompt="Answer:", max_tokens=8, temperature=0, extra_body={"guided_choice": ["yes", "no"]}
    )
    assert r.choices[0].text in ("yes", "no")
    with pytest.raises(openai.BadRequestError, match="structured output needs mode ar, selfspec or auto"):
        client.chat.completions.create(
            model=MODEL, messages=CHAT, response_format={"type": "json_object"}, extra_body={"mode": "diffusion"}
        )


@pytest.mark.parametrize(
    "body,message",
    [
        ({"tool_choice": "required"}, "needs `tools`"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "'image_url'"),
        ({"chat_template_kwargs": {"chat_template": "{{ 1 }}"}}, "may not set \\['chat_template'\\]"),
    ],
)
def test_what_trimode_cannot_do_is_refused_by_name(server, body, message):
    r = httpx.post(server + "/v1/chat/completions", json={"model": MODEL, "messages": CHAT, **body}, timeout=30)
    assert r.status_code == 400
    assert re.search(message, r.json()["error"]["message"])


@pytest.mark.slow  # a load test: 64 streams, some 7 s
def test_64_concurrent_streams_mixing_modes(client, offline):
    modes = ["ar", "diffusion", "selfspec"]
    prompts = [[{"role": "user", "content": f"Copy: {i} {i + 7} {3 * i}"}] for i in range(64)]

    def one(i: int) -> str:
        stream = client.chat.completions.create(
            model=MODEL,
            messages=prompts[i],
            temperature=0,
            max_tokens=16,
            stream=True,
            extra_body={"mode": modes[i % 3]},
        )
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        texts = list(pool.map(one, range(64)))
    for i, text in enumerate(texts):
        assert (
            text == offline.chat(prompts[i], SamplingParams(temperature=0.0, mode=modes[i % 3], max_tokens=16))[0].text
        )


def aborted(url: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in httpx.get(url + "/metrics").text.splitlines()
        if line.startswith("trimode_requests_total{") and 'status="abort"' in line
    )


def wait_idle(url: str, seconds: float = 5) -> None:
    deadline = time.time() + seconds
    while metric(url, "trimode_running_batch") > 0 and time.time() < deadline:
        time.sleep(0.1)
    assert metric(url, "trimode_running_batch") == 0


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_frees_its_slot(server, client, stream):
    before = aborted(server)
    # 2000 tokens take ~15 s to generate here: the slot must be freed long before that.
    body = {
        "model": MODEL,
        "prompt": "import os\n",
        "max_tokens": 2000,
        "temperature": 0,
        "stream": stream,
        "ignore_eos": True,
    }
    if stream:
        with httpx.stream("POST", server + "/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    break  # one chunk, then hang up
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server + "/v1/completions", json=body, timeout=1.0)  # gives up, closing the connection
    wait_idle(server)
    assert aborted(server) == before + 1
    r = client.completions.create(model=MODEL, prompt="x = ", max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


def bad_requests():
    ok = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    bodies = [
        b"{not json",
        b"",
        b"[]",
        b"null",
        "\xff\xfe".encode("latin-1") + b'{"model": 1}',
        json.dumps({**ok, "max_tokens": 10**9}).encode(),
        json.dumps({**ok, "max_tokens": -1}).encode(),
        json.dumps({**ok, "temperature": -1}).encode(),
        json.dumps({**ok, "temperature": "hot"}).encode(),
        json.dumps({**ok, "top_p": 0}).encode(),
        json.dumps({**ok, "mode": "fast"}).encode(),
        json.dumps({**ok, "n": 0}).encode(),
        json.dumps({**ok, "logprobs": 99}).encode(),
        json.dumps({**ok, "block_length": 0}).encode(),
        json.dumps({**ok, "threshold": 2}).encode(),
        json.dumps({**ok, "stop": [""]}).encode(),
        json.dumps({**ok, "messages": []}).encode(),
        json.dumps({**ok, "messages": [{"role": "wizard", "content": "x"}]}).encode(),
        json.dumps({**ok, "frequency_penalty": 5.0}).encode(),
        json.dumps({**ok, "functions": [{"name": "f"}]}).encode(),  # unknown fields are ignored, not this one
        json.dumps({"messages": ok["messages"]}).encode(),
        json.dumps({**ok, "model": "gpt-9"}).encode(),
        json.dumps({**ok, "seed": "abc"}).encode(),
        json.dumps({**ok, "stream_options": {"include_usage": True}}).encode(),
        json.dumps({**ok, "messages": [{"role": "user", "content": "x" * 300_000}]}).encode(),
    ]
    return bodies


def test_bad_input_barrage_gets_4xx_and_the_server_stays_healthy(server, client, offline):
    bodies = bad_requests()
    statuses = []
    with httpx.Client(base_url=server, timeout=30) as http:
        for i in range(1000):
            body = bodies[i % len(bodies)]
            path = "/v1/chat/completions" if i % 2 == 0 else "/v1/completions"
            r = http.post(path, content=body, headers={"content-type": "application/json"})
            statuses.append(r.status_code)
            err = r.json()["error"]
            assert {"message", "type", "param", "code"} <= err.keys() and err["message"]
        big = http.post("/v1/completions", content=b"x" * 2_000_000, headers={"content-type": "application/json"})
        assert big.status_code == 413
    assert all(400 <= s < 500 for s in statuses), sorted(set(statuses))
    assert 404 in statuses and 400 in statuses
    assert httpx.get(server + "/health").json()["status"] == "ok"
    r = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=24)
    assert r.choices[0].message.content == offline.chat(CHAT, SamplingParams(temperature=0.0, max_tokens=24))[0].text


def test_api_key_and_full_queue():
    proc, url = start_server("--api-key", "s3cret", "--max-batch", "1", "--max-queue", "1")
    try:
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert httpx.get(url + "/v1/models", headers=auth).status_code == 200
        body = {"model": MODEL, "prompt": "import os\n", "max_tokens": 60, "ignore_eos": True, "temperature": 0}

        def post(_: int) -> httpx.Response:
            return httpx.post(url + "/v1/completions", json=body, headers=auth, timeout=120)

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(post, range(6)))
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) >= 2 and 429 in codes, codes
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.headers["retry-after"] and refused.json()["error"]["type"] == "rate_limit_error"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_serve_binds_loopback_by_default():
    from trimode.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1"


def test_bench_over_http_measures_what_offline_generates(server, offline, tmp_path, capsys):
    """Two rounds, interleaved: every prompt once per configuration per round, the same tokens as
    offline; slices in a shuffled order, reversed in the second round (ABBA); an A/A control."""
    from trimode.bench.runner import encode
    from trimode.bench.suites import task_suite
    from trimode.cli import main
    from trimode.sampling_params import MODES

    out = tmp_path / "http"
    assert (
        main(
            [
                "bench",
                "--endpoint",
                server + "/v1",
                "--modes",
                "ar,selfspec,mixed",
                "--concurrency",
                "1,4",
                "--num-prompts",
                "3",
                "--max-tokens",
                "16",
                "--warmup",
                "0",
                "--repeats",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    doc = json.loads((out / "results.json").read_text())
    assert doc["model"] == MODEL and {"latency.png", "tokens_per_s_vs_batch.png"} <= set(doc["plots"])
    rounds = [line.split(": ", 1) for line in capsys.readouterr().out.splitlines() if line.startswith("round ")]
    first = [label for r, label in rounds if r == "round 1/2"]
    assert [label for r, label in rounds if r == "round 2/2"] == first[::-1] and len(first) == 7
    assert {len(v) for v in doc["samples"].values()} == {2}  # one slice per round
    (control,) = [r for r in doc["results"] if r["control"]]
    assert control["label"] == "ar c1 (A/A)" and "speedup_vs_ar_ci" in control
    prompts = task_suite(3)
    ids = encode(offline, prompts)

    def offline_figures(modes: list[str]) -> tuple[int, int, float]:
        outs = [
            offline.generate([i], SamplingParams(temperature=0.0, mode=m, max_tokens=16, seed=0))[0]
            for i, m in zip(ids, modes)
        ]
        correct = [p.is_correct(o.text) for p, o in zip(prompts, outs)]
        return (
            sum(o.num_generated_tokens for o in outs),
            sum(o.num_forwards for o in outs),
            sum(correct) / len(correct),
        )

    for r in doc["results"]:
        # Every prompt once a round; mixed gives request k the mode k % 3, whatever the concurrency.
        modes = [MODES[k % 3] for k in range(3)] if r["mode"] == "mixed" else [r["mode"]] * 3
        tokens, forwards, accuracy = offline_figures(modes)
        assert (r["num_requests"], r["num_failed"]) == (2 * 3, 0)
        assert r["num_generated_tokens"] == 2 * tokens and r["tokens_per_forward"] == round(tokens / forwards, 4)
        assert r["accuracy"] == round(accuracy, 4)
        assert 0 < r["ttft_ms"]["p50"] <= r["ttft_ms"]["p99"] and r["itl_ms"]["p50"] > 0
        assert r["output_tokens_per_s"] > 0
    assert set(doc["results"][2]["by_mode"]) == set(MODES)


def test_bench_over_http_counts_failures_and_runs_for_a_duration(server, tmp_path, capsys):
    from trimode.cli import main

    out = tmp_path / "dur"
    assert (
        main(
            [
                "bench",
                "--endpoint",
                server + "/v1",
                "--modes",
                "diffusion",
                "--concurrency",
                "2",
                "--duration",
                "1",
                "--max-tokens",
                "8",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    r = json.loads((out / "results.json").read_text())["results"][0]
    assert r["num_failed"] == 0 and r["num_requests"] >= 2 and r["seconds"] >= 1
    # A model the server does not serve: every request fails with the server's 404, and the run says so.
    assert (
        main(
            [
                "bench",
                "--endpoint",
                server + "/v1",
                "--served-model",
                "gpt-9",
                "--modes",
                "ar",
                "--concurrency",
                "2",
                "--num-prompts",
                "4",
                "--warmup",
                "0",
                "--repeats",
                "1",
                "--out",
                str(tmp_path / "bad"),
            ]
        )
        == 1
    )
    r = json.loads((tmp_path / "bad" / "results.json").read_text())["results"][0]
    assert (r["num_requests"], r["num_failed"]) == (0, 4) and "HTTP 404" in r["failures"][0]
    assert main(["bench", "--endpoint", "http://127.0.0.1:9/v1", "--concurrency", "1"]) == 2
    assert "cannot reach" in capsys.readouterr().err


def test_forced_tool_calls_need_a_parser(client):
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError, match="--tool-call-parser"):
        client.chat.completions.create(model=MODEL, messages=CHAT, tools=[tool], tool_choice="required", max_tokens=4)


def test_models_say_the_training_length_beside_the_positions(server):
    (card, *_) = httpx.get(server + "/v1/models", timeout=30).json()["data"]
    assert card["max_model_len"] == 262144 and card["training_seq_len"] == 256  # the embedded model's
