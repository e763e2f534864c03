"""Server defects of the hostile run in issue 24 (items 3, 7, 9 and 11), each pinned by a test that
reproduces it: the app in-process, and under uvicorn with the server's own HTTP protocol where the
connection handling is what failed."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from live import MODEL, in_process, run_client

from trimode import LLM, SamplingParams

pytest.importorskip("fastapi")

CHAT = [{"role": "user", "content": "Reverse: 12 7 33 4"}]
READ_TIMEOUT = 0.5  # the answers below take at least twice this long


@pytest.fixture(scope="module")
def offline():
    return LLM()


@pytest.fixture(scope="module")
def served(offline):
    with in_process(offline.engine(max_batch=16, max_queue=64), MODEL) as served:
        yield served


def run(app, fn):
    # A handler's exception reaches the client as the server's 500, not as an error in the test.
    return run_client(app, fn, raise_app_exceptions=False)


def post(app, path: str, body: dict) -> httpx.Response:
    return run(app, lambda c: c.post(path, json={"model": MODEL, **body}))


# --- item 3: long answers to HTTP/1.0 and `Connection: close` clients ---------------------------


@pytest.fixture()
def slow_port(served, monkeypatch) -> Iterator[int]:
    """The app under uvicorn with the server's HTTP protocol and a short read timeout, on an engine
    whose steps each take 50 ms longer."""
    import uvicorn

    from trimode.server.http_server import bounded_protocol

    engine, app = served
    real_step = engine.engine.step

    def slow_step():
        time.sleep(0.05)
        return real_step()

    monkeypatch.setattr(engine.engine, "step", slow_step)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", http=bounded_protocol(16, READ_TIMEOUT))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield server.servers[0].sockets[0].getsockname()[1]
    server.should_exit = True
    thread.join(timeout=10)


def exchange(port: int, request: bytes) -> bytes:
    """Everything the server sends back until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        received = []
        while data := s.recv(65536):
            received.append(data)
    return b"".join(received)


@pytest.mark.parametrize(
    "version, connection", [("HTTP/1.0", ""), ("HTTP/1.1", "Connection: close\r\n")], ids=["http1.0", "close"]
)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_long_answer_reaches_a_client_that_asked_to_close(slow_port, offline, version, connection, stream):
    """Pins: an answer taking longer than --read-timeout was cut when the client spoke HTTP/1.0 or
    sent `Connection: close` (h11 marks such a client MUST_CLOSE, not DONE, once its request is in,
    and the read timer closed anything not DONE): 0 bytes, or a stream without [DONE]."""
    body = {"model": MODEL, "prompt": "def add(a, b):", "max_tokens": 24, "ignore_eos": True, "temperature": 0}
    content = json.dumps({**body, "stream": stream}).encode()
    head = (
        f"POST /v1/completions {version}\r\nHost: t\r\n{connection}"
        f"Content-Type: application/json\r\nContent-Length: {len(content)}\r\n\r\n"
    )
    start = time.time()
    raw = exchange(slow_port, head.encode() + content)
    assert raw.startswith(b"HTTP/1.1 200 OK"), raw[:200]  # a server speaks its own version
    assert time.time() - start > 2 * READ_TIMEOUT
    payload = raw.split(b"\r\n\r\n", 1)[1]
    want = offline.generate(body["prompt"], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[0].text
    if stream:
        events = [line[6:] for line in payload.decode(errors="replace").splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == want
    else:
        assert json.loads(payload)["choices"][0]["text"] == want


def test_a_request_still_arriving_is_cut_at_the_read_timeout(slow_port):
    """The read timeout still evicts a client that is slow to send its request, in HTTP/1.0 too."""
    head = "POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    start = time.time()
    assert exchange(slow_port, head.encode()) == b""
    assert time.time() - start < READ_TIMEOUT + 2


# --- item 7: scoring is bounded, and a large answer is built off the event loop -------------------


def test_scoring_is_capped_per_request_with_a_400_that_says_how(served):
    """Pins: `echo, logprobs 20, max_tokens 1, n 4` over 8 prompts of 4,000 characters asked for 2.7M
    log-probabilities (60 s of engine time, a 64 MB answer) unrefused. Two prompts of 100 token ids,
    echo, logprobs 4, max_tokens 1: (100 + 1) x 5 x 2 = 1,010 entries per sample."""
    engine, default_app = served
    from trimode.server.app import build_app

    app = build_app(engine, MODEL, max_logprob_entries=1010)
    body = {"prompt": [[7] * 100, [9] * 100], "echo": True, "logprobs": 4, "max_tokens": 1}
    ok = post(app, "/v1/completions", body)
    assert ok.status_code == 200, ok.text
    assert [len(c["logprobs"]["tokens"]) for c in ok.json()["choices"]] == [101, 101]
    for over in ({"n": 2}, {"max_tokens": 2}, {"logprobs": 5}, {"prompt": [[7] * 101, [9] * 100]}):
        r = post(app, "/v1/completions", {**body, **over})
        assert r.status_code == 400, (over, r.text)
        assert "at most 1,010 per request" in r.json()["error"]["message"]
    r = post(app, "/v1/completions", {**body, "n": 2})
    assert "asks for 2,020 log-probabilities" in r.json()["error"]["message"]
    chat = {"messages": CHAT, "logprobs": True, "top_logprobs": 20, "max_tokens": 49}  # 49 x 21 = 1,029
    assert post(app, "/v1/chat/completions", chat).status_code == 400
    assert post(app, "/v1/chat/completions", {**chat, "max_tokens": 48}).status_code == 200
    hostile = {"prompt": ["1 2 3 4 " * 500] * 8, "echo": True, "logprobs": 20, "max_tokens": 1, "n": 4}
    start = time.time()
    r = post(default_app, "/v1/completions", hostile)  # the request, under the default cap
    assert r.status_code == 400 and "log-probabilities" in r.json()["error"]["message"]
    assert time.time() - start < 5
    assert engine.status.running == engine.status.waiting == 0


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_large_answer_is_built_off_the_event_loop(served, monkeypatch, stream):
    """Pins: a scored prompt's answer (64 MB in the hostile run) was built and serialised on the
    event loop, and /health waited up to 1.4 s. Here building the logprobs takes 1.5 s; /health
    must not wait for it."""
    import trimode.server.answers as answers

    engine, app = served
    real, threads = answers.completion_logprobs, []

    def slow(*args, **kwargs):
        threads.append(threading.current_thread())
        if len(threads) == 1:  # the answer's first choice, or the stream's first (echo) chunk
            time.sleep(1.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(answers, "completion_logprobs", slow)
    body = {"model": MODEL, "prompt": "def add(a, b):", "echo": True, "logprobs": 5, "max_tokens": 4, "stream": stream}

    async def go(c):
        answer = asyncio.ensure_future(c.post("/v1/completions", json=body))
        slowest = 0.0  # the longest /health round while the answer is on its way
        while not answer.done():
            start = time.perf_counter()
            assert (await c.get("/health")).status_code == 200
            await asyncio.sleep(0.01)
            slowest = max(slowest, time.perf_counter() - start)
        return await answer, slowest

    answer, slowest = run(app, go)
    assert answer.status_code == 200
    # Well under the 1.5 s the answer takes to build; not tighter, as a loaded 2-core machine can
    # stall any round by half a second.
    assert threads and slowest < 1.0, slowest
    assert threads[0] is not threading.main_thread()
    assert "data: [DONE]" in answer.text if stream else answer.json()["choices"][0]["logprobs"]["tokens"]


# --- items 9 and 11: malformed requests get a 400 naming the field --------------------------------


REFUSED = {
    # item 9: each was a 500
    "json_schema not an object": (
        "/v1/chat/completions",
        {"messages": CHAT, "response_format": {"type": "json_schema", "json_schema": "x"}},
        None,
        "json_schema",
    ),
    "schema text nested 200k deep": (
        "/v1/chat/completions",
        {"messages": CHAT, "guided_json": "[" * 200_000 + "]" * 200_000},
        None,
        "nests too deeply",
    ),
    "schema text nested in structured_outputs": (
        "/v1/chat/completions",
        {"messages": CHAT, "structured_outputs": {"json": '{"a": ' * 100_000}},
        None,
        "nests too deeply",
    ),
    "template global shadowed": (
        "/v1/chat/completions",
        {
            "messages": [*CHAT, {"role": "tool", "content": "4", "tool_call_id": "a"}],
            "chat_template_kwargs": {"raise_exception": "x"},
        },
        "chat_template_kwargs",
        "raise_exception",
    ),
    "jinja global shadowed": (
        "/v1/chat/completions",
        {"messages": CHAT, "chat_template_kwargs": {"range": 1}},
        "chat_template_kwargs",
        "range",
    ),
    # item 11: each was accepted, coerced
    "bools as token ids": ("/v1/completions", {"prompt": [True, False]}, "prompt", "token ids"),
    "strings as token ids": ("/v1/completions", {"prompt": [["1", "2"]]}, "prompt", "token ids"),
    "floats as token ids": ("/v1/completions", {"prompt": [1.0, 2.0]}, "prompt", "token ids"),
    "a bool as max_tokens": ("/v1/completions", {"prompt": "x", "max_tokens": True}, "max_tokens", "integer"),
    "a string as temperature": ("/v1/completions", {"prompt": "x", "temperature": "0"}, "temperature", "number"),
    "a spaced logit_bias key": ("/v1/completions", {"prompt": "x", "logit_bias": {" 5": 1}}, "logit_bias", "0-9"),
    "an Arabic-Indic logit_bias key": (
        "/v1/completions",
        {"prompt": "x", "logit_bias": {"\u0665": 1}},
        "logit_bias",
        "0-9",
    ),
    "an underscored logit_bias key": (
        "/v1/completions",
        {"prompt": "x", "logit_bias": {"1_0": 1}},
        "logit_bias",
        "0-9",
    ),
    "null user content": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": None}]},
        "messages.0.content",
        "content",
    ),
    "missing user content": ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages.0.content", "content"),
    "null assistant content without tool calls": (
        "/v1/chat/completions",
        {"messages": [*CHAT, {"role": "assistant", "content": None}, *CHAT]},
        "messages.1.content",
        "tool_calls",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_malformed_requests_get_a_400_naming_the_field(served, case):
    """Pins issue 24's items 9 (a 500 where a 400 belongs: a json_schema that is not an object, a
    schema string nested past the recursion limit, chat_template_kwargs shadowing a template global)
    and 11 (lax coercion: booleans, floats and digit strings taken as token ids, `true` as
    max_tokens, int() reading " 5", "\u0665" and "1_0" as logit_bias keys, a user turn without
    content)."""
    path, body, param, words = REFUSED[case]
    r = post(served[1], path, {"max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and words in error["message"]
    assert error["param"] == param


def test_chat_template_kwargs_may_shadow_no_template_global(offline):
    """The names chat_template_kwargs may not set cover every global of the tokenizer's template
    environment, including any added there later."""
    from trimode.server.protocol import RESERVED_TEMPLATE_NAMES

    assert set(offline.tokenizer._env.globals) <= RESERVED_TEMPLATE_NAMES


def test_what_the_openai_api_accepts_still_works(served):
    """Strict types refuse coercion, not the OpenAI API's own shapes."""
    app = served[1]
    tool_call = {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    for path, body in [
        ("/v1/completions", {"prompt": [1, 2, 3]}),
        ("/v1/completions", {"prompt": [[1, 2], [3]]}),
        ("/v1/completions", {"prompt": ["x", "y"], "logit_bias": {"5": 1, "07": -2.5}, "temperature": 1}),
        ("/v1/chat/completions", {"messages": [*CHAT, {"role": "assistant", "tool_calls": [tool_call]}, *CHAT]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}),
        ("/v1/chat/completions", {"messages": CHAT, "guided_json": '{"type": "object"}'}),
        ("/v1/chat/completions", {"messages": CHAT, "chat_template_kwargs": {"enable_thinking": True}}),
    ]:
        r = post(app, path, {"max_tokens": 2, **body})
        assert r.status_code == 200, (body, r.text)
