"""Stop strings (trimode/engine/stop_strings.py, Request): found incrementally with the same
results as searching the whole text each step (a stop may straddle steps; the earliest-starting
one wins; include_stop_str_in_output), what streams is held back exactly as far as a tail could
still grow into a stop string, and a step's cost does not grow with the number and length of the
stop strings (issue 24, item 10: 64 stop strings of 256 characters made 16 requests 2.4x slower)."""

from __future__ import annotations

import random
import time

import pytest

from trimode import SamplingParams
from trimode.engine.request import Request, streamable_text


class CharTokenizer:
    """Token id i is the character chr(i): the text of any ids is known exactly."""

    def decode_stream(self, skip_special_tokens: bool = True) -> list:
        return []

    def decode_step(self, stream: list, token_id: int) -> str:
        return chr(token_id)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(map(chr, ids))


def reference(chunks: list[str], stops: list[str], include: bool) -> tuple[str, int, list[str]]:
    """Search the whole text after each step: (final text, tokens kept, what streamed each step)."""
    text, streamed = "", []
    for chunk in chunks:
        text += chunk
        hits = [(i, i + len(s)) for s in stops for i in range(len(text)) if text.startswith(s, i)]
        if hits:
            start, end = min(hits)
            return text[: end if include else start], end, streamed
        hold = max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        streamed.append(text[: len(text) - hold])
    return text, len(text), streamed


def run(chunks: list[str], stops: list[str], include: bool) -> tuple[str, int, list[str]]:
    req = Request(
        None, [1], SamplingParams(temperature=0.0, max_tokens=10_000, stop=stops, include_stop_str_in_output=include)
    )
    tok, streamed = CharTokenizer(), []
    for chunk in chunks:
        req.emit([ord(c) for c in chunk], set(), tok, 0.0)
        if req.finish_reason is not None:
            return req.text, len(req.token_ids), streamed
        streamed.append(streamable_text(req))
    return req.text, len(req.token_ids), streamed


@pytest.mark.parametrize("seed", range(300))
def test_incremental_search_equals_searching_the_whole_text(seed):
    rng = random.Random(seed)
    stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 5))]
    text = "".join(rng.choice("abc") for _ in range(40))
    cuts = sorted(rng.sample(range(1, 40), rng.randint(0, 12)))
    chunks = [text[i:j] for i, j in zip([0, *cuts], [*cuts, 40])]
    include = rng.random() < 0.5
    assert run(chunks, stops, include) == reference(chunks, stops, include), (stops, chunks)


def test_earliest_start_wins_and_a_stop_may_straddle_steps():
    assert run(["xabc", "d"], ["bc", "abcd"], False)[0] == "xa"  # "bc" ends a step first
    assert run(["xabcd"], ["bc", "abcd"], False)[0] == "x"  # same step: "abcd" starts first
    assert run(["xa", "b", "cdy"], ["abcd"], True) == ("xabcd", 5, ["x", "x"])


def test_step_cost_does_not_grow_with_the_stop_strings():
    """Issue 24 item 10: every step searched each stop string and tried each of its prefixes as the
    text's tail, O(stops x length) Python work per row and step."""
    rng = random.Random(0)
    many = ["".join(rng.choice("ab") for _ in range(256)) for _ in range(64)]
    text = [ord(rng.choice("ab")) for _ in range(400)]

    def seconds(stops: list[str]) -> float:
        req = Request(None, [1], SamplingParams(temperature=0.0, max_tokens=10_000, stop=stops, ignore_eos=True))
        req.emit([ord("c")], set(), CharTokenizer(), 0.0)  # builds the automaton, once per request
        start = time.perf_counter()
        for t in text:
            req.emit([t], set(), CharTokenizer(), 0.0)
            streamable_text(req)
        assert req.finish_reason is None
        return time.perf_counter() - start

    one = min(seconds(["zz"]) for _ in range(3))
    assert min(seconds(many) for _ in range(3)) < 10 * one
