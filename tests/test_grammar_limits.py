"""Grammars whose cost or failure could hurt (issue 24, items 5 and 6): a grammar's work per step is
bounded and one past the bounds is refused when compiled (a 400 on the server); one that fails at
run time ends its request with an error naming the grammar, never with text outside it under
finish_reason "stop"; a grammar that is complete ends its request. On the embedded model."""

from __future__ import annotations

import re

import httpx
import pytest
from live import MODEL

from trimode import LLM, SamplingParams
from trimode.engine.request import Request
from trimode.structured import Grammars

SELF_REQUIRED = {  # no finite JSON value matches: each node requires two more
    "$defs": {
        "n": {
            "type": "object",
            "properties": {"l": {"$ref": "#/$defs/n"}, "r": {"$ref": "#/$defs/n"}},
            "required": ["l", "r"],
        }
    },
    "$ref": "#/$defs/n",
}
BIG_SCHEMA = {  # larger than real schemas: must still compile within the limits
    "type": "object",
    "properties": {f"field_{i}": {"type": ["string", "integer", "null"], "maxLength": 200} for i in range(200)},
    "required": [f"field_{i}" for i in range(0, 200, 3)],
}


@pytest.fixture(scope="module")
def embedded():
    return LLM(compile=False)


@pytest.fixture(scope="module")
def grammars(embedded):
    return Grammars(embedded.tokenizer, embedded.runner.config.vocab_size, embedded.eos_token_ids)


def run_to_completion(engine) -> tuple[dict, dict]:
    """Step until idle: (request id -> output, request id -> error)."""
    results, errors = {}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.error is not None:
                assert out.is_request_error, out.error  # the request's own, not an engine bug
                errors[out.request_id] = out.error
            elif out.finished:
                results[out.request_id] = out.output
    return results, errors


@pytest.mark.parametrize(
    "spec,error",
    [
        # Item 5: 490,000 expressions cost 0.11 s of the engine's thread per step under the default
        # fuel; now past the lexer's initial fuel, seen on the first token.
        ({"regex": "(a{700}){700}"}, "lexer error: too many expressions"),
        ({"regex": "(a{300}){300}"}, "lexer error: too many expressions"),
        # Item 6: these returned "aa" and "{" with finish_reason "stop".
        ({"regex": "(a{1000}){1000}"}, "lexer error: too many expressions"),
        ({"json": SELF_REQUIRED}, "Too many items"),
        ({"choice": [f"c{i}" for i in range(2001)]}, "max is 2000"),
    ],
)
def test_grammars_past_the_limits_are_refused_when_compiled(embedded, spec, error):
    with pytest.raises(ValueError, match=f"^structured output: .*{re.escape(error)}"):
        embedded.generate("x", SamplingParams(temperature=0.0, max_tokens=4, structured=spec))


def test_real_grammars_compile_within_the_limits(grammars):
    for spec in [
        {"json": BIG_SCHEMA},
        {"json": {"type": "object", "properties": {"s": {"type": "string", "maxLength": 5000}}}},
        {"json": {"enum": [f"option {i}" for i in range(500)]}},
        {"json_object": True},
        {"regex": "(a{200}){200}"},
        {"regex": r"((25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(25[0-5]|2[0-4]\d|1?\d?\d)"},
        {"choice": [f"option number {i}" for i in range(1000)]},
        {"grammar": 'start: "(" item ("," item)* ")"\nitem: /[a-z]+/ | start'},
    ]:
        grammars.matcher(spec)


def test_a_choice_shorter_than_min_tokens_is_refused(embedded):
    """Item 6: choice ["yes", "no"] with min_tokens 8 (EOS forbidden until then) emitted "no*\\*\\*..."
    with finish_reason "stop"."""
    with pytest.raises(ValueError, match="min_tokens=8 is more tokens than the longest choice can take"):
        embedded.generate(
            "x", SamplingParams(temperature=0.0, max_tokens=16, min_tokens=8, structured={"choice": ["yes", "no"]})
        )
    [out] = embedded.generate(
        "x", SamplingParams(temperature=0.0, max_tokens=16, min_tokens=1, structured={"choice": ["yes", "no"]})
    )
    assert out.text in ("yes", "no") and out.finish_reason == "stop"


def test_a_grammar_that_ends_before_min_tokens_fails_its_request_alone(embedded):
    """Item 6: the grammar is complete after 3 digits, but min_tokens forbids EOS: the request ends
    with an error naming its grammar (RequestOutput.error, the request's own: a 400), not with tokens outside
    the grammar; its neighbour in the batch finishes as usual."""
    engine = embedded.engine()
    digits = SamplingParams(max_tokens=16, min_tokens=8, temperature=1.0, seed=0, structured={"regex": "[0-9]{3}"})
    engine.add_request("bad", "x", digits)
    engine.add_request("good", "x", SamplingParams(temperature=0.0, max_tokens=16, structured={"regex": "[0-9]{3}"}))
    results, errors = run_to_completion(engine)
    assert set(errors) == {"bad"} and "structured output (regex): it ended after" in errors["bad"]
    assert re.fullmatch("[0-9]{3}", results["good"].text) and results["good"].finish_reason == "stop"


def test_a_complete_grammar_ends_the_request(embedded):
    """Item 6: once the grammar allows nothing more the request stops, even with ignore_eos (which
    went on emitting up to max_tokens)."""
    out = embedded.generate(
        ["x", "def f():"],
        SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, structured={"choice": ["yes", "no"]}),
    )
    assert [(o.text in ("yes", "no"), o.finish_reason) for o in out] == [(True, "stop")] * 2


def test_a_token_the_grammar_rejects_ends_the_request_with_an_error(embedded, grammars):
    """Item 6: a token the matcher rejected (a failed grammar's mask lets junk through) was appended
    and the request went on; `consume_token`'s answer was never read."""
    tok = embedded.tokenizer
    req = Request(None, [1], SamplingParams(temperature=0.0, max_tokens=16, structured={"regex": "[0-9]+"}))
    req.grammar = grammars.matcher(req.params.structured)
    req.emit(tok.encode("12", add_special_tokens=False) + tok.encode("ab", add_special_tokens=False), set(), tok, 0.0)
    assert req.text == "12" and req.finish_reason == "error"
    assert req.error.startswith("structured output (regex): token ")


def test_the_server_refuses_or_fails_such_grammars_instead_of_answering_200(tool_server):
    """Item 6 through HTTP: a grammar past the limits is a 400; one that fails at run time is a 400
    naming the grammar (streamed: an error event), never a 200 with finish_reason "stop" nor a 500
    that calls the request's own conflict an internal error."""
    url = tool_server[1]  # the session's shared server of the embedded model
    body = {"model": MODEL, "prompt": "x", "max_tokens": 16}
    r = httpx.post(url + "/v1/completions", json={**body, "guided_regex": "(a{700}){700}"}, timeout=60)
    assert r.status_code == 400 and "structured output: lexer error" in r.text, r.text
    failing = {**body, "guided_regex": "[0-9]{3}", "min_tokens": 8, "temperature": 1, "seed": 0}
    r = httpx.post(url + "/v1/completions", json=failing, timeout=60)
    assert r.status_code == 400 and "structured output (regex): it ended after" in r.text, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"  # not an "internal error" 500
    r = httpx.post(url + "/v1/completions", json={**failing, "stream": True}, timeout=60)
    assert "structured output (regex)" in r.text and '"finish_reason":"stop"' not in r.text.replace(" ", "")
    assert '"code": 400' in r.text, r.text
