"""Tool calls: the parsers on scripted model text (whole, streamed in every chunking, malformed),
their grammars, and a live server driven by the openai client with the embedded model, whose
calls under tool_choice "required" are valid because the grammar makes them so."""

from __future__ import annotations

import json
import random

import httpx
import pytest
from live import MODEL

from trimode.llm import EMBEDDED_MODEL_DIR
from trimode.server.tool_parsers import PARSERS, ToolStream, tool_parser
from trimode.tokenizer import Tokenizer

openai = pytest.importorskip("openai")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}


def render(parser: str, calls: list[tuple[str, dict]]) -> str:
    """Calls as each format writes them."""
    if parser == "mistral":
        return "".join(f"[TOOL_CALLS]{name}[ARGS]{json.dumps(args)}" for name, args in calls)
    return "\n".join(
        f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(args)}}}\n</tool_call>' for name, args in calls
    )


def streamed(parser: str, text: str, rng: random.Random, truncated: bool = False) -> tuple[str, list[tuple[str, str]]]:
    """`text` fed in random chunks: the content and the (name, arguments) the deltas assemble to."""
    stream, content, calls = ToolStream(tool_parser(parser)), "", {}
    at = 0
    while at < len(text):
        step = rng.randint(1, 7)
        delta = stream.feed(text[at : at + step])
        at += step
        content += delta.content
        assert "<tool_call>" not in content and "[TOOL_CALLS]" not in content or not calls  # no markup leaks
        for d in delta.tool_calls:
            name, args = calls.get(d["index"], ("", ""))
            calls[d["index"]] = (name + d["function"].get("name", ""), args + d["function"].get("arguments", ""))
    content += stream.finish(truncated).content
    return content, [calls[i] for i in sorted(calls)]


CASES = [
    ("", [("get_weather", {"city": "Paris", "days": 2})]),
    ("Let me look that up. ", [("get_weather", {"city": "Oslo", "days": 1}), ("add", {"a": 1, "b": [2, "x"]})]),
    ("<tool", []),  # a prefix of the markup that never becomes one: content, once the stream ends
    ("plain [TOOL answer < tool_call", []),
]


@pytest.mark.parametrize("parser", sorted(PARSERS))
@pytest.mark.parametrize("content,calls", CASES)
def test_whole_and_streamed_answers_read_the_same_calls(parser, content, calls):
    text = content + render(parser, calls)
    got_content, got = tool_parser(parser).parse(text)
    want = [(n, json.dumps(a)) for n, a in calls]
    assert got_content == (content if calls else text)
    assert [(c.name, c.arguments) for c in got] == want
    assert all(c.message()["type"] == "function" and c.id.startswith("call_") for c in got)
    for seed in range(20):  # many chunkings of the same text
        assert streamed(parser, text, random.Random(seed)) == (got_content, want)


@pytest.mark.parametrize("parser", sorted(PARSERS))
def test_malformed_markup_is_content_never_an_error(parser):
    good = render(parser, [("add", {"a": 1})])
    for bad in (
        good[:-3],
        good.replace("add", "no spaces allowed"),
        good + " trailing words",
        good.replace("{", "[", 1),
    ):
        assert tool_parser(parser).parse(bad) == (bad, []), bad
    truncated = good + render(parser, [("add", {"a": 2})])[:-4]  # max_tokens cut the second call
    content, calls = tool_parser(parser).parse(truncated, truncated=True)
    assert content == "" and [c.arguments for c in calls] == ['{"a": 1}']
    assert streamed(parser, truncated, random.Random(0), truncated=True) == ("", [("add", '{"a": 1}')])


def test_mistrals_json_array_form():
    rome = json.dumps({"city": "Rome"})  # arguments as JSON text, as some templates write them
    text = "[TOOL_CALLS]" + json.dumps(
        [{"name": "add", "arguments": {"a": 1}}, {"name": "get_weather", "arguments": rome}]
    )
    _, calls = tool_parser("mistral").parse(text)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("add", {"a": 1}), ("get_weather", {"city": "Rome"})]
    assert tool_parser("mistral").parse('[TOOL_CALLS][{"name": "add"}, 3]')[1] == []


def test_parallel_false_streams_one_call():
    text = render("hermes", [("add", {"a": 1}), ("add", {"a": 2})])
    stream = ToolStream(tool_parser("hermes"), limit=1)
    deltas = stream.feed(text).tool_calls + stream.finish().tool_calls
    assert {d["index"] for d in deltas} == {0} and stream.finish().content == ""


def test_an_unknown_parser_is_named():
    with pytest.raises(ValueError, match="--tool-call-parser must be one of hermes, mistral"):
        tool_parser("qwen")


@pytest.fixture(scope="module")
def client(tool_server):
    return openai.OpenAI(base_url=tool_server[1] + "/v1", api_key="unused", max_retries=0)


ASK = [{"role": "user", "content": "What is the weather in Paris for 3 days?"}]


def _valid_weather(name: str, arguments: str) -> None:
    args = json.loads(arguments)
    assert name == "get_weather" and set(args) == {"city", "days"}
    assert isinstance(args["city"], str) and isinstance(args["days"], int)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_calls_are_valid_whole_and_streamed(client, choice):
    kw = dict(model=MODEL, messages=ASK, tools=[WEATHER, ADD] if choice == "required" else [ADD, WEATHER])
    kw |= dict(tool_choice=choice, parallel_tool_calls=False, temperature=0, max_tokens=80)
    r = client.chat.completions.create(**kw)
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and not r.choices[0].message.content
    if choice != "required":
        _valid_weather(call.function.name, call.function.arguments)
    assert call.function.name in {"get_weather", "add"} and isinstance(json.loads(call.function.arguments), dict)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    names = "".join(tc.function.name or "" for c in chunks for tc in c.choices[0].delta.tool_calls or [])
    args = "".join(tc.function.arguments or "" for c in chunks for tc in c.choices[0].delta.tool_calls or [])
    assert (names, args) == (call.function.name, call.function.arguments)  # greedy: the same call
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)


def test_tool_choice_errors_are_clear(client):
    bad = (
        (dict(tool_choice="required"), "needs `tools`"),
        (dict(tools=[ADD], tool_choice={"type": "function", "function": {"name": "mul"}}), "not among the tools"),
        (dict(tools=[{"type": "function", "function": {"name": "a b"}}]), "letters, digits"),
        (
            dict(tools=[ADD], tool_choice="required", response_format={"type": "json_object"}),
            "leave out response_format",
        ),
        (dict(tools=[ADD], tool_choice="always"), 'tool_choice must be "none"'),
    )
    for extra, message in bad:
        with pytest.raises(openai.BadRequestError, match=message):
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, **extra)


def test_auto_without_a_call_answers_in_text(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[ADD], temperature=0, max_tokens=8)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")


def test_a_call_and_its_result_round_trip_through_the_template(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=80
    )
    call = r.choices[0].message.tool_calls[0]
    turns = [
        *ASK,
        r.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    rendered = httpx.post(
        str(client.base_url).removesuffix("/v1/") + "/tokenize", json={"model": MODEL, "messages": turns}, timeout=30
    ).json()["tokens"]
    text = Tokenizer.from_dir(EMBEDDED_MODEL_DIR).decode(rendered)
    assert f'<tool_call>\n{{"name": "get_weather", "arguments": {call.function.arguments}}}\n</tool_call>' in text
    assert "<tool_response>\nsunny\n</tool_response>" in text
    again = client.chat.completions.create(model=MODEL, messages=turns, tools=[WEATHER], temperature=0, max_tokens=8)
    assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_langchain_binds_tools_and_gets_structured_output(client):
    """LangChain's two tool paths: `bind_tools(...).invoke` and `with_structured_output(method=
    "function_calling")`, which names its schema as the one function to call."""
    langchain_openai = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel

    class Weather(BaseModel):
        """The weather in a city over some days."""

        city: str
        days: int

    chat = langchain_openai.ChatOpenAI(
        model=MODEL, base_url=str(client.base_url), api_key="unused", temperature=0, max_tokens=80, max_retries=0
    )
    message = chat.bind_tools([WEATHER], tool_choice="any").invoke("Weather in Paris for 3 days?")
    (call,) = message.tool_calls
    assert (
        call["name"] == "get_weather"
        and isinstance(call["args"]["city"], str)
        and isinstance(call["args"]["days"], int)
    )
    weather = chat.with_structured_output(Weather, method="function_calling").invoke("Weather in Oslo for 2 days?")
    assert isinstance(weather, Weather)


def test_forced_arguments_take_no_properties_their_schema_does_not_list():
    """JSON Schema allows extra properties unless told otherwise; a forced model given that freedom
    invents keys until max_tokens, so the grammar closes every listed object (not open ones, nor
    ones whose schema speaks of others), at every depth."""
    from trimode.server.tool_parsers.base import closed

    nested = {"type": "object", "properties": {"a": {"type": "integer"}}}
    schema = {
        "type": "object",
        "properties": {"properties": nested, "list": {"type": "array", "items": nested}},
        "$defs": {"open": {"type": "object", "properties": {}, "additionalProperties": True}},
        "anyOf": [nested, {"type": "object"}],
    }
    shut = {**nested, "additionalProperties": False}
    assert closed(schema) == {
        **schema,
        "properties": {"properties": shut, "list": {"type": "array", "items": shut}},
        "anyOf": [shut, {"type": "object"}],
        "additionalProperties": False,
    }
    assert '"additionalProperties": false' in tool_parser("hermes").grammar([WEATHER], False)
