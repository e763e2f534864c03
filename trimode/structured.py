"""Structured output: a grammar every generated token must keep valid (a JSON schema, any JSON
object, a regular expression, a choice of strings, or a Lark grammar), by masking the logits of
every pick that emits text, in AR and self-spec. Diffusion reveals a block's positions in any order,
which a left-to-right grammar cannot check, so it is refused (SamplingParams).

The grammar engine is llguidance (Microsoft's, also behind vLLM's `guidance` backend and
llama.cpp): a wheel with no dependencies whose masks are computed lazily per step. xgrammar needs
torch, transformers and triton at install (a CUDA build on this CPU machine); outlines-core compiles
a regex's index over the whole vocabulary up front, per schema.

A request's matcher lives on the host and follows its emitted tokens. A pass whose positions emit
tokens in sequence (self-spec verify) asks for each position's mask after the drafts before it
(`paths`): the matcher consumes them, computes, and rolls back. Positions past a draft the grammar
rejects get the mask of the last valid one; their drafts are rejected by the verify anyway.

A grammar's cost is bounded (`parser_limits`), and a grammar that fails is refused at compile time where its
first token shows it (`Grammars.matcher`); one that fails later ends its request with an error
(`Request.emit`), never with text outside the grammar.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from typing import Any

import llguidance
import torch

from trimode.tokenizer import Tokenizer

KINDS = ("json", "json_object", "regex", "choice", "grammar")


def parser_limits() -> llguidance.LLParserLimits:
    """Bounds on one matcher's work (llguidance's ParserLimits)."""
    # The lexer builds a regex's expressions
    # lazily, and a mask step's work grows with their number: `(a{700}){700}` (490,000 of them, within
    # the default fuel of 1,000,000) cost 0.11 s per step on the embedded model's vocabulary. 100,000
    # bounds the largest accepted (`(a{220}){220}`) to ~0.01 s per step and refuses that one when its
    # first token is probed; real schemas need far less (200 properties of three types: ~10,000). The
    # per-step fuels stay at their defaults (200,000 lexer steps ~ 14 ms, 50,000 Earley items ~ 2.5 ms,
    # llguidance's measures), sized for vocabularies of 100k+ tokens. Short errors: a verbose one dumps
    # the parser's state.
    return llguidance.LLParserLimits(
        initial_lexer_fuel=100_000, step_lexer_fuel=200_000, step_max_items=50_000, verbose_errors=False
    )


def check_spec(spec: object) -> None:
    """ValueError unless `spec` is {kind: value} with one of KINDS."""
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ValueError(
            f"SamplingParams.structured must be one of {{'json': schema}}, {{'json_object': True}}, "
            f"{{'regex': pattern}}, {{'choice': [strings]}}, {{'grammar': lark}}; got {spec!r:.80}"
        )


def grammar_text(spec: dict[str, Any]) -> str:
    """llguidance's grammar for a spec (`check_spec`)."""
    kind, value = next(iter(spec.items()))
    if kind in ("json", "json_object"):
        schema = {"type": "object"} if kind == "json_object" else value
        # Nesting past Python's recursion limit, in JSON text or in the dict, is the caller's error.
        try:
            if isinstance(schema, str):
                schema = json.loads(schema)
            if not isinstance(schema, dict):
                raise ValueError("a JSON schema must be an object")
            # Compact JSON, one space after ',' and ':' (as json.dumps writes it): a model free to
            # put any whitespace between tokens can fill its budget with newlines.
            layout = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
            return llguidance.grammar_from("json_schema", json.dumps({**schema, "x-guidance": layout}))
        except RecursionError:
            raise ValueError("the JSON schema nests too deeply") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"the JSON schema is not JSON: {e}") from None
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise ValueError("a choice must be a non-empty list of non-empty strings")
        return llguidance.grammar_from("choice", json.dumps(value))
    if not isinstance(value, str):
        raise ValueError(f"a {kind} must be a string")
    return llguidance.grammar_from("regex" if kind == "regex" else "lark", value)


@functools.lru_cache(maxsize=4)
def _ll_tokenizer(tokenizer: Tokenizer, vocab_size: int, eos_ids: tuple[int, ...]) -> llguidance.LLTokenizer:
    """A tokenizer's llguidance form, built once per tokenizer (it indexes the vocabulary's bytes),
    not once per engine: offline `generate` makes an engine per call."""
    return llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=vocab_size, eos_token=list(eos_ids))


class Grammars:
    """Matchers for one tokenizer, vocabulary and set of EOS ids."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: set[int]) -> None:
        self._tokenizer, self.vocab_size, self._eos = tokenizer, vocab_size, tuple(sorted(eos_ids))
        self._limits = parser_limits()

    def matcher(self, spec: dict[str, Any], min_tokens: int = 0) -> llguidance.LLMatcher:
        """A fresh matcher for `spec`; ValueError naming the problem if the grammar is invalid, fails
        on its first token, or cannot last `min_tokens` tokens."""
        ll = _ll_tokenizer(self._tokenizer, self.vocab_size, self._eos)
        try:
            text = grammar_text(spec)
        except (ValueError, TypeError) as e:
            raise ValueError(f"structured output: {e}") from e
        matcher = llguidance.LLMatcher(ll, text, log_level=0, limits=self._limits)
        error = matcher.get_error() or self._first_token_error(matcher)
        if error:
            raise ValueError(f"structured output: {error_line(error)}")
        kind, value = next(iter(spec.items()))
        longest = max(len(c.encode()) for c in value) if kind == "choice" else min_tokens
        if min_tokens > longest:  # every token but EOS carries a byte, and EOS cannot come first
            raise ValueError(
                f"structured output: min_tokens={min_tokens} is more tokens than the longest choice can "
                f"take ({longest}, a byte each)"
            )
        return matcher

    def _first_token_error(self, matcher: llguidance.LLMatcher) -> str:
        """What a copy of `matcher` fails with on its first allowed token but EOS, or "". llguidance
        builds its lexer and parser lazily, so the limits and errors a grammar runs into show there
        (`(a{700}){700}`, a choice of more than 2,000 strings, a schema that requires itself), not
        when it is constructed."""
        probe = matcher.deep_copy()
        allowed = _set_bits(probe.compute_bitmask(), self.vocab_size)
        token = next((t for t in allowed if t not in self._eos), None)
        if token is not None:  # else only EOS: the grammar matches the empty text alone
            probe.consume_token(token)
        return probe.get_error()


def error_line(error: str) -> str:
    """The first line of an llguidance error (the rest marks where its verbose state would be)."""
    return error.split("\n", 1)[0]


def _set_bits(mask: bytes, n: int) -> Iterator[int]:
    """The ids below `n` whose bit is set in an llguidance bitmask (bit j of byte i: id 8i + j)."""
    return (8 * i + j for i, b in enumerate(mask) if b for j in range(8) if b >> j & 1 and 8 * i + j < n)


def masks(
    matchers: list[llguidance.LLMatcher | None],
    paths: list[list[list[int] | None]],
    vocab: int,
    device: torch.device,
) -> torch.Tensor:
    """(B, T, V) bool, True = allowed: row b's position t after its matcher consumes paths[b][t]
    (a None path, and every position of a row without a matcher, is free). A row's paths are
    prefixes of one sequence (nothing, then the drafts one by one), consumed once, in order, and
    rolled back at the end."""
    width = max(len(p) for p in paths)
    words = -(-vocab // 32)
    packed = torch.full((len(matchers), width, words), -1, dtype=torch.int32)
    for b, (matcher, row) in enumerate(zip(matchers, paths)):
        if matcher is None:
            continue
        consumed: list[int] = []
        last = None
        for t, path in enumerate(row):
            if path is None:
                continue
            new = path[len(consumed) :]
            taken = matcher.try_consume_tokens(new) if new else 0
            consumed += new[:taken]
            if len(consumed) < len(path):  # past a rejected draft: its position never emits
                packed[b, t] = packed[b, last] if last is not None else -1
                continue
            packed[b, t] = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32)[:words]
            last = t
        if consumed:
            matcher.rollback(len(consumed))
    bits = torch.arange(32, dtype=torch.int32, device=device)
    allowed = (packed.to(device)[..., None] >> bits) & 1  # (B, T, words, 32): bit j of word w is token 32w + j
    return allowed.flatten(-2)[..., :vocab].bool()
