"""One request's state on the host (`Request`: what it has emitted, its text, stop strings,
logprobs, preemption), and applying what a step emitted to the running requests: EOS, stop strings,
max_tokens, finished rows leaving the batch."""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from trimode import logit_controls
from trimode.decoding import pass_width, prefill_tail, widest_exact_pass
from trimode.decoding.base import DecodeBatch, Decoder, HostEmission
from trimode.engine.stop_strings import StopMatcher, stop_matcher
from trimode.outputs import GenerationOutput, Logprob, PositionLogprobs
from trimode.sampler import RandomStream
from trimode.sampling_params import MAX_LOGPROBS, Mode, SamplingParams
from trimode.structured import error_line
from trimode.tokenizer import DecodeStream, Tokenizer


@dataclass
class Request:
    """One request's state on the host: what it has emitted and why it finished."""

    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str = ""
    arrival: float = 0.0  # time.perf_counter() when it arrived; token_times are relative to it
    # The client request it is one sample (or prompt) of: the scheduler shares rows and queue
    # places fairly between parents, not between samples. None: a parent of its own.
    parent_id: str | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop token id or stop string that ended it
    num_forwards: int = 0
    stats: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    stream: RandomStream | None = field(default=None, repr=False)  # its random numbers, kept across preemption
    # After a preemption: how many output tokens its next prefill feeds after the prompt, the seed it
    # then feeds (None: the prefill picks the next token), and the forwards it had taken before.
    num_resumed: int = 0
    resume_seed: int | None = None
    num_forwards_before: int = 0
    # Incremental detokenisation: the text so far, grown by each token's new characters only, and
    # len(text) after each token (to cut the tokens at a stop string). O(1) work per token, not a
    # decode of the whole output every step.
    _stream: DecodeStream | None = field(default=None, repr=False)
    _ends: list[int] = field(default_factory=list, repr=False)
    # Its stop strings' automaton and its state after the text so far (`stop_strings`): each step
    # searches only the new characters.
    _stops: StopMatcher | None = field(default=None, repr=False)
    _stop_state: int = field(default=0, repr=False)
    # Its structured output's grammar state (llguidance), following its emitted tokens.
    grammar: Any = field(default=None, repr=False)
    # Mode auto: the decoding it runs now (the engine moves it between exact decodings), and the
    # cycles each decoding served.
    decoding: SamplingParams | None = None
    cycles: collections.Counter[str] = field(default_factory=collections.Counter, repr=False)
    error: str | None = None  # why its grammar failed at run time (the engine then fails it)
    # A waiting request with the same context, admitted before it (`Scheduler.add`).
    after: Request | None = field(default=None, repr=False)
    # When asked for (params.logprobs / prompt_logprobs): per output token, and per prompt token.
    logprobs: list[PositionLogprobs] | None = None
    prompt_logprobs: list[PositionLogprobs | None] | None = None

    def __post_init__(self) -> None:
        self.logprobs = [] if self.params.logprobs is not None else None

    @property
    def decode_params(self) -> SamplingParams:
        """How it decodes now: its own params, or for mode auto the decoding the engine chose."""
        return self.decoding if self.decoding is not None else self.params

    @property
    def is_auto(self) -> bool:
        return self.params.mode == Mode.AUTO

    @property
    def pass_width(self) -> int:
        """Tokens its row feeds per decode pass (`decoding.pass_width`); mode auto: the widest of
        the decodings it may move to."""
        return widest_exact_pass() if self.is_auto else pass_width(self.params)

    @property
    def prefill_tail(self) -> int:
        """Masks its prefill feeds after its context (`decoding.prefill_tail`)."""
        return 0 if self.is_auto and self.decoding is None else prefill_tail(self.decode_params)

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Whether its prefill must score the prompt: asked, and not all scored (by earlier chunks,
        or before a preemption)."""
        scored = self.prompt_logprobs is not None and len(self.prompt_logprobs) == len(self.prompt_ids)
        return self.params.prompt_logprobs is not None and not scored

    def reset(self) -> None:
        """Back to the state before its prefill (to run that prefill again)."""
        self.logprobs = [] if self.params.logprobs is not None else None
        self.prompt_logprobs = None
        if self.grammar is not None:
            self.grammar.reset()
        self.token_ids, self.text, self.finish_reason, self.num_forwards, self.error = [], "", None, 0, None
        self.stop_reason = None
        self.stats.clear()
        self.cycles.clear()
        self.token_times, self._stream, self._ends, self._stop_state = [], None, [], 0
        self.stream, self.num_resumed, self.resume_seed, self.num_forwards_before = None, 0, None, 0

    @property
    def context_ids(self) -> list[int]:
        """What its next prefill feeds: the prompt, and after a preemption the output it resumes from."""
        return self.prompt_ids + self.token_ids[: self.num_resumed]

    def preempt(self, pending_commit: bool) -> None:
        """It lost its KV pages: resume later by prefilling its prompt and output (see
        `Decoder.pending_commit`). Its output so far, its text and its random stream are kept (the
        stream rewound to its last emission: what it drew for the work it loses, it draws again)."""
        self.num_forwards_before = self.num_forwards
        if self.stream is not None:
            self.stream.rewind()
        if pending_commit or not self.token_ids:
            self.num_resumed, self.resume_seed = len(self.token_ids), None
        else:
            self.num_resumed, self.resume_seed = len(self.token_ids) - 1, self.token_ids[-1]

    def emit(
        self,
        tokens: list[int],
        eos_ids: set[int],
        tokenizer: Tokenizer,
        now: float,
        entries: list[list[float]] | None = None,
    ) -> None:
        """Append tokens (emitted at `now`, with their `logprob_table` entries when asked for);
        finish on EOS, a stop string, its grammar's end or max_tokens, whichever first. A token its
        grammar rejects is not appended: the request ends with an error (`error`)."""
        if self._stream is None:
            self._stream = tokenizer.decode_stream(self.params.skip_special_tokens)
        if tokens and self.stream is not None:  # where a preemption rewinds its random stream to
            self.stream.emitted_at = self.stream.draws
        if self.params.max_tokens == 0:  # it only scored its prompt
            self.finish_reason = "length"
            return
        searched = len(self.text)
        for i, t in enumerate(tokens):
            if self.grammar is not None and not self.grammar.consume_token(t):
                self._grammar_failed(f"token {t} broke it: {error_line(self.grammar.get_error())}")
                break
            if self.logprobs is not None and entries is not None and self.params.logprobs is not None:
                self.logprobs.append(position_logprobs(entries[i], t, self.params.logprobs, tokenizer))
            self.token_ids.append(t)
            self.token_times.append(now)
            self.text += tokenizer.decode_step(self._stream, t)
            self._ends.append(len(self.text))
            if (t in eos_ids and not self.params.ignore_eos) or t in self.params.stop_token_ids:
                self.finish_reason = "stop"
                self.stop_reason = t if t in self.params.stop_token_ids else None  # EOS: None, as vLLM
                break
            if self.grammar is not None and self.grammar.is_stopped():  # complete: only EOS could follow
                if len(self.token_ids) < self.params.min_tokens:
                    self._grammar_failed(f"it ended after {len(self.token_ids)} tokens, before min_tokens")
                else:
                    self.finish_reason = "stop"
                break
            if len(self.token_ids) >= self.params.max_tokens:
                self.finish_reason = "length"
                break
        if not self._apply_stop_strings(searched) and self.finish_reason is not None:
            # The stream holds back an incomplete UTF-8 tail; the final text is the full decode.
            self.text = tokenizer.decode(self.token_ids, self.params.skip_special_tokens)

    def _grammar_failed(self, why: str) -> None:
        """End with an error naming the grammar: its output so far is a prefix the grammar allows, but
        finishing it as a success would break the client's contract."""
        kind = next(iter(self.params.structured or {"grammar": None}))
        self.error = f"structured output ({kind}): {why}"
        self.finish_reason = "error"

    def _apply_stop_strings(self, searched: int) -> bool:
        """Cut at the earliest-starting stop string that ends in the new text (it may begin in the
        old); True if one did."""
        if not self.params.stop:
            return False
        if self._stops is None:
            self._stops = stop_matcher(tuple(self.params.stop))
        self._stop_state, hit = self._stops.scan(self._stop_state, self.text, searched)
        if hit is None:
            return False
        cut, end = hit
        # Keep the shortest token prefix whose text holds the whole stop string; the text ends before it.
        n = next(i for i, e in enumerate(self._ends) if e >= end) + 1
        self.token_ids, self.token_times, self._ends = self.token_ids[:n], self.token_times[:n], self._ends[:n]
        if self.logprobs is not None:
            self.logprobs = self.logprobs[:n]
        self.stop_reason = self.text[cut:end]
        self.text = self.text[: end if self.params.include_stop_str_in_output else cut]
        self.finish_reason = "stop"
        return True

    def output(self, decoder: Decoder, forward_ms: dict[str, float], seconds: float) -> GenerationOutput:
        return GenerationOutput(
            prompt=self.prompt,
            prompt_token_ids=self.prompt_ids,
            text=self.text,
            token_ids=self.token_ids,
            finish_reason=self.finish_reason or "length",
            stop_reason=self.stop_reason,
            mode="auto" if self.is_auto else decoder.mode,
            num_forwards=self.num_forwards,
            seconds=round(seconds, 4),
            token_times=self.token_times,
            mode_stats={decoder.stat_name: self.stats} if decoder.stat_name else {},
            forward_ms=forward_ms,
            logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
            decodings=dict(self.cycles) if self.is_auto else None,
        )


def position_logprobs(entry: list[float], token: int, k: int, tokenizer: Tokenizer) -> PositionLogprobs:
    """A `logprob_table` entry as vLLM reports a position: the chosen token first, then the `k`
    most likely (those not already listed)."""
    out = {token: Logprob(entry[0], int(entry[1]), tokenizer.decode_token(token))}
    top = MAX_LOGPROBS
    for rank, (tid, lp) in enumerate(zip(entry[2 : 2 + k], entry[2 + top : 2 + top + k]), 1):
        out.setdefault(int(tid), Logprob(lp, rank, tokenizer.decode_token(int(tid))))
    return out


def record_prompt_logprobs(
    requests: list[Request], tables: list[list[list[float]]], starts: list[int], tokenizer: Tokenizer
) -> None:
    """File a prefill's (or a prefill chunk's) prompt entries: row i fed context positions from
    `starts[i]`, and its entry j scores the prompt token at starts[i] + j + 1."""
    for req, table, start in zip(requests, tables, starts):
        k, prompt = req.params.prompt_logprobs, req.prompt_ids
        if k is None or not req.wants_prompt_logprobs:
            continue
        if start == 0:
            req.prompt_logprobs = [None]
        filed = req.prompt_logprobs
        assert filed is not None, "a prompt's entries arrive from its first position on"
        for j, entry in enumerate(table):
            at = start + j + 1
            if at < len(prompt) and at == len(filed):
                filed.append(position_logprobs(entry, prompt[at], k, tokenizer))


def apply_step(
    batch: DecodeBatch,
    active: list[Request],
    emitted: list[list[int]],
    eos_ids: set[int],
    tokenizer: Tokenizer,
    host: HostEmission | None = None,
    rows: list[int] | None = None,
) -> list[Request]:
    """Give each row its emitted tokens (and their logprob entries: row `rows[i]` of the step's
    `host` copy for request i, when the batch was split from the one that ran), drop finished rows
    from the batch; returns the rows left."""
    now = time.perf_counter()
    tables = host.logprobs if host is not None else None
    for i, (req, tokens, n) in enumerate(zip(active, emitted, batch.num_forwards)):
        entries = None if tables is None else tables[rows[i] if rows is not None else i]
        req.emit(tokens, eos_ids, tokenizer, now - req.arrival, entries)
        req.num_forwards = req.num_forwards_before + n
    logit_controls.record(batch.controls, emitted)
    keep = [i for i, r in enumerate(active) if r.finish_reason is None]
    if len(keep) < len(active):
        for i, req in enumerate(active):
            if req.finish_reason is not None:  # its prompt and output: the next turn of a chat starts so
                batch.kv.register_prefix(i, req.prompt_ids + req.token_ids)
        batch.select_rows(keep)
    left = [active[i] for i in keep]
    set_remaining(batch, left)
    return left


def set_remaining(batch: DecodeBatch, rows: list[Request]) -> None:
    """Each row's budget left, derived from its request (rows aligned with the batch)."""
    batch.remaining = torch.tensor([r.params.max_tokens - len(r.token_ids) for r in rows], device=batch.seeds.device)


def streamable_text(req: Request) -> str:
    """The part of the text that can no longer change: hold back a trailing replacement character
    (an incomplete UTF-8 sequence) and any suffix that could still grow into a stop string."""
    text = req.text
    if req.finish_reason is not None:
        return text
    # The automaton's depth: the longest tail that is the start of a stop string (not a whole one,
    # or the request would have finished).
    hold = req._stops.depth[req._stop_state] if req._stops is not None else 0
    return text[: len(text) - hold].rstrip("\ufffd")
