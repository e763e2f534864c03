"""What `vllm serve` users expect besides generation: several served names, /v1/models/{id},
/version, /tokenize and /detokenize, --seed, --generation-config and --chat-template. In process
(httpx over ASGI), over one engine on the embedded model."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from live import MODEL

from trimode import LLM, SamplingParams, __version__
from trimode.cli import main
from trimode.cli.serve import chat_template, generation_defaults
from trimode.engine.inputs import chat_messages
from trimode.llm import EMBEDDED_MODEL_DIR
from trimode.server.app import build_app
from trimode.server.async_engine import AsyncEngine
from trimode.tokenizer import Tokenizer

CHAT = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Reverse: 12 7 33 4"}]


@pytest.fixture(scope="module")
def offline():
    return LLM()


@pytest.fixture(scope="module")
def engine(offline):
    engine = AsyncEngine(offline.engine(max_batch=8, max_queue=32))
    engine.start()
    yield engine
    engine.shutdown()


def call(app, *requests):
    """Send (method, path, json) requests in order; their responses."""

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
            return [await c.request(method, path, json=body) for method, path, body in requests]

    return asyncio.run(main())


def test_served_names_model_cards_and_version(engine):
    app = build_app(engine, [MODEL, "alias"])
    body = {"model": "alias", "prompt": "import os", "max_tokens": 4, "temperature": 0}
    listed, card, missing, done, version = call(
        app,
        ("GET", "/v1/models", None),
        ("GET", "/v1/models/alias", None),
        ("GET", "/v1/models/nope", None),
        ("POST", "/v1/completions", body),
        ("GET", "/version", None),
    )
    assert [m["id"] for m in listed.json()["data"]] == [MODEL, "alias"]
    assert card.json()["id"] == "alias" and card.json()["max_model_len"] == engine.engine.max_model_len
    assert missing.status_code == 404 and "serves `trimode-embedded`, `alias`" in missing.json()["error"]["message"]
    assert done.status_code == 200 and done.json()["model"] == MODEL  # responses carry the first name
    assert version.json() == {"version": __version__}


def test_tokenize_and_detokenize(engine, offline):
    tok = offline.tokenizer
    ids = tok.encode("def f(x):")
    with_bos, without, chat, back, bad, both = call(
        build_app(engine, MODEL),
        ("POST", "/tokenize", {"prompt": "def f(x):"}),
        ("POST", "/tokenize", {"prompt": "def f(x):", "add_special_tokens": False}),
        ("POST", "/tokenize", {"model": MODEL, "messages": CHAT}),
        ("POST", "/detokenize", {"tokens": ids}),
        ("POST", "/detokenize", {"tokens": [10**9]}),
        ("POST", "/tokenize", {"prompt": "x", "messages": CHAT}),
    )
    assert with_bos.json() == {"count": len(ids), "max_model_len": engine.engine.max_model_len, "tokens": ids}
    assert without.json()["tokens"] == ids[1:] and ids[0] == offline.config.bos_token_id
    assert (
        chat.json()["tokens"] == offline.chat(CHAT, SamplingParams(temperature=0.0, max_tokens=1))[0].prompt_token_ids
    )
    assert chat.json()["tokens"] == tok.encode_chat(chat_messages(CHAT))
    assert back.json() == {"prompt": tok.decode(ids)}
    assert bad.status_code == 400 and "outside" in bad.json()["error"]["message"]
    assert both.status_code == 400 and "one of them" in both.json()["error"]["message"]


def test_seed_and_generation_defaults(engine, offline):
    """--seed: unseeded sampled requests draw their seeds from it, so a rerun in the same order
    samples the same; --generation-config: defaults for what a request leaves unset."""
    sampled = {"model": MODEL, "prompt": "def parse(line):", "max_tokens": 16}
    first = [call(build_app(engine, MODEL, seed=7), ("POST", "/v1/completions", sampled))[0] for _ in range(2)]
    assert first[0].json()["choices"] == first[1].json()["choices"]
    a, b = call(build_app(engine, MODEL, seed=7), *[("POST", "/v1/completions", sampled)] * 2)
    assert a.json()["choices"] == first[0].json()["choices"] and b.json()["choices"] != a.json()["choices"]
    greedy = offline.generate("def parse(line):", SamplingParams(temperature=0.0, max_tokens=5))[0].text
    app = build_app(engine, MODEL, generation_defaults={"temperature": 0.0, "max_tokens": 5})
    (r,) = call(app, ("POST", "/v1/completions", {"model": MODEL, "prompt": "def parse(line):"}))
    assert r.json()["choices"][0]["text"] == greedy


def test_serve_flags_read_templates_and_generation_configs(tmp_path):
    own = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "t.jinja").write_text(own)
    assert chat_template(str(tmp_path / "t.jinja")) == own == chat_template(own)
    with pytest.raises(ValueError, match="no such file, and not a Jinja template"):
        chat_template("missing.jinja")
    tok = Tokenizer.from_dir(EMBEDDED_MODEL_DIR)
    tok.set_chat_template(own)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "max_new_tokens": 7}))
    assert generation_defaults(str(tmp_path), None) == {"temperature": 0.6, "max_tokens": 7}
    assert generation_defaults("auto", str(tmp_path)) == {"temperature": 0.6, "max_tokens": 7}
    assert generation_defaults("vllm", str(tmp_path)) is None
    assert generation_defaults("auto", None) == {}  # the embedded model's names no sampling field
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 3}))
    with pytest.raises(ValueError, match="generation_config.json: SamplingParams.top_p"):
        generation_defaults(str(tmp_path), None)


def test_serve_takes_the_model_once(capsys):
    assert main(["serve", "dir-a", "--model", "dir-b"]) == 2
    assert "give the model once" in capsys.readouterr().err
