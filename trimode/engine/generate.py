"""Request state and the mode-agnostic pieces of an engine step: prefill, one decode step, and
applying what a step emitted (EOS, stop strings, max_tokens, finished rows leaving the batch)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from trimode.decoding.base import DecodeBatch, Decoder, Forward
from trimode.engine.model_runner import ModelRunner
from trimode.outputs import GenerationOutput
from trimode.sampler import Sampler
from trimode.sampling_params import SamplingParams
from trimode.tokenizer import DecodeStream, Tokenizer


@dataclass
class Request:
    """One request's state on the host: what it has emitted and why it finished."""

    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str = ""
    arrival: float = 0.0  # time.perf_counter() when it arrived; token_times are relative to it
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    num_forwards: int = 0
    stats: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    # Incremental detokenisation: the text so far, grown by each token's new characters only, and
    # len(text) after each token (to cut the tokens at a stop string). O(1) work per token, not a
    # decode of the whole output every step.
    _stream: DecodeStream | None = field(default=None, repr=False)
    _ends: list[int] = field(default_factory=list, repr=False)

    def reset(self) -> None:
        """Back to the state before its prefill (to run that prefill again)."""
        self.token_ids, self.text, self.finish_reason, self.num_forwards = [], "", None, 0
        self.stats.clear()
        self.token_times, self._stream, self._ends = [], None, []

    def emit(self, tokens: list[int], eos_ids: set[int], tokenizer: Tokenizer, now: float) -> None:
        """Append tokens (emitted at `now`); finish on EOS, a stop string or max_tokens, whichever first."""
        if self._stream is None:
            self._stream = tokenizer.decode_stream()
        searched = len(self.text)
        for t in tokens:
            self.token_ids.append(t)
            self.token_times.append(now)
            self.text += tokenizer.decode_step(self._stream, t)
            self._ends.append(len(self.text))
            if t in eos_ids and not self.params.ignore_eos:
                self.finish_reason = "stop"
                break
            if len(self.token_ids) >= self.params.max_tokens:
                self.finish_reason = "length"
                break
        if not self._apply_stop_strings(searched) and self.finish_reason is not None:
            # The stream holds back an incomplete UTF-8 tail; the final text is the full decode.
            self.text = tokenizer.decode(self.token_ids)

    def _apply_stop_strings(self, searched: int) -> bool:
        """Cut at the first stop string that ends in the new text; True if one did."""
        if not self.params.stop:
            return False
        start = max(0, searched - max(len(s) for s in self.params.stop) + 1)  # a stop may straddle the old end
        hits = [(i, i + len(s)) for i, s in ((self.text.find(s, start), s) for s in self.params.stop) if i >= 0]
        if not hits:
            return False
        cut, end = min(hits)
        # Keep the shortest token prefix whose text holds the whole stop string; the text ends before it.
        n = next(i for i, e in enumerate(self._ends) if e >= end) + 1
        self.token_ids, self.token_times, self._ends = self.token_ids[:n], self.token_times[:n], self._ends[:n]
        self.text = self.text[:cut]
        self.finish_reason = "stop"
        return True

    def output(self, decoder: Decoder, forward_ms: dict[str, float], seconds: float) -> GenerationOutput:
        return GenerationOutput(
            prompt=self.prompt,
            prompt_token_ids=self.prompt_ids,
            text=self.text,
            token_ids=self.token_ids,
            finish_reason=self.finish_reason or "length",
            mode=decoder.mode,
            num_forwards=self.num_forwards,
            seconds=round(seconds, 4),
            token_times=self.token_times,
            mode_stats={decoder.stat_name: self.stats} if decoder.stat_name else {},
            forward_ms=forward_ms,
        )


def new_batch(runner: ModelRunner, requests: list[Request], eos_ids: set[int]) -> DecodeBatch:
    """An empty batch for `requests`: a KV cache sized for their prompts, budgets and one block."""
    cfg, device = runner.config, runner.device
    params = [r.params for r in requests]
    block = max(sp.block_length for sp in params)
    capacity = int(max(len(r.prompt_ids) + r.params.max_tokens for r in requests)) + block + 1
    return DecodeBatch(
        kv=runner.new_cache(len(requests), capacity),
        sampler=Sampler(params, device),
        seeds=torch.zeros(len(requests), dtype=torch.long, device=device),
        remaining=torch.tensor([sp.max_tokens for sp in params]),
        eos_ids=torch.tensor(sorted(eos_ids), device=device),
        stop_on_eos=torch.tensor([not sp.ignore_eos for sp in params], device=device),
        mask_id=cfg.mask_token_id,
        num_forwards=torch.zeros(len(requests), dtype=torch.long),
        stats=[r.stats for r in requests],
    )


def prefill(runner: ModelRunner, requests: list[Request], eos_ids: set[int]) -> tuple[DecodeBatch, list[list[int]]]:
    """A new batch for `requests`, prefilled together; returns it and each row's first token."""
    batch, device = new_batch(runner, requests, eos_ids), runner.device
    lengths = torch.tensor([len(r.prompt_ids) for r in requests])
    padded = torch.zeros(len(requests), int(lengths.max()), dtype=torch.long)
    for i, r in enumerate(requests):
        padded[i, : len(r.prompt_ids)] = torch.tensor(r.prompt_ids)
    # Right-padded: row b's pad slots lie past its length and stay invisible.
    logits = runner.execute(batch, Forward("prefill", padded.to(device), True, logit_index=(lengths - 1).to(device)))
    batch.kv.set_lengths(lengths)
    batch.seeds = batch.sampler.pick(logits)[:, 0]
    return batch, [[t] for t in batch.seeds.tolist()]


def prefill_chunk(runner: ModelRunner, batch: DecodeBatch, request: Request, max_tokens: int) -> list[int] | None:
    """Feed the next (at most `max_tokens`) prompt tokens of a one-row batch into its KV cache.
    Returns the first generated token once the whole prompt is in, else None."""
    done, prompt = int(batch.kv.lengths[0]), request.prompt_ids
    chunk = prompt[done : done + max_tokens]
    tokens = torch.tensor([chunk], device=runner.device)
    logit_index = torch.tensor([len(chunk) - 1], device=runner.device)
    logits = runner.execute(batch, Forward("prefill", tokens, True, logit_index=logit_index))
    batch.kv.commit()
    if done + len(chunk) < len(prompt):
        return None
    batch.seeds = batch.sampler.pick(logits)[:, 0]
    return batch.seeds.tolist()


def apply_step(
    batch: DecodeBatch, active: list[Request], emitted: list[list[int]], eos_ids: set[int], tokenizer: Tokenizer
) -> list[Request]:
    """Give each row its emitted tokens, drop finished rows from the batch; returns the rows left."""
    now = time.perf_counter()
    for req, tokens, n in zip(active, emitted, batch.num_forwards.tolist()):
        req.emit(tokens, eos_ids, tokenizer, now - req.arrival)
        req.num_forwards = n
    keep = [i for i, r in enumerate(active) if r.finish_reason is None]
    if keep and len(keep) < len(active):
        batch.select_rows(torch.tensor(keep))
    left = [active[i] for i in keep]
    set_remaining(batch, left)
    return left


def set_remaining(batch: DecodeBatch, rows: list[Request]) -> None:
    """Each row's budget left, derived from its request (rows aligned with the batch)."""
    batch.remaining = torch.tensor([r.params.max_tokens - len(r.token_ids) for r in rows])


def decode_step(runner: ModelRunner, decoder: Decoder, batch: DecodeBatch) -> list[list[int]]:
    """One forward for every row of `batch`: the decoder plans it, the runner runs it, the decoder
    takes its logits. Returns the tokens each row emitted."""
    return decoder.accept(batch, runner.execute(batch, decoder.plan(batch)))


def forward_ms(batch: DecodeBatch) -> dict[str, float]:
    return {k: round(1000 * s / n, 3) for k, (n, s) in batch.timings.items()}


@dataclass
class RequestOutput:
    request_id: str
    delta_text: str  # newly committed text, safe to stream (no split UTF-8, no partial stop string)
    new_token_ids: list[int]
    finished: bool
    output: GenerationOutput | None = None  # the whole result, once finished
    error: str | None = None  # set when serving the request failed (an engine bug, not the request's input)


def streamable_text(req: Request) -> str:
    """The part of the text that can no longer change: hold back a trailing replacement character
    (an incomplete UTF-8 sequence) and any suffix that could still grow into a stop string."""
    text = req.text
    if req.finish_reason is not None:
        return text
    text = text.rstrip("\ufffd")
    hold = max((n for s in req.params.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
    return text[: len(text) - hold]
