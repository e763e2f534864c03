"""Logit controls that read a request's tokens so far (vLLM's logits processors): OpenAI's presence
and frequency penalties, the repetition penalty (CTRL, Keskar et al. 2019, applied as Hugging Face
and vLLM do), `logit_bias` and `min_tokens`. They reshape the logits that every pick reads, in
every mode; the log-probabilities reported stay the model's own.

Their per-row state is `LogitControls`, (B, V) and (B,) tensors that follow rows as they join and
leave (`trimode.rows`; a row without controls reads zeros, which switch every control
off: the repetition penalty is kept as r - 1). The host adds each step's emitted tokens
(`record`): a copy to the device, no read back. A pass whose positions emit several tokens in
sequence (self-spec verify) passes `within`, the counts of the tokens before each position in the
pass, so position i is penalised exactly as an AR step after those tokens would be.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trimode.rows import Rows
from trimode.sampling_params import SamplingParams


@dataclass
class LogitControls(Rows):
    """The controls' per-row state. A row without controls is all zeros (`Rows.blank`), which
    switches every control off: the repetition penalty is kept as r - 1."""

    counts: torch.Tensor  # (B, V) float: how often the row has emitted each token
    prompt: torch.Tensor  # (B, V) bool: tokens in the row's prompt (the repetition penalty's "seen")
    bias: torch.Tensor  # (B, V) float: logit_bias
    stops: torch.Tensor  # (B, V) bool: the tokens min_tokens holds back (EOS, stop_token_ids)
    presence: torch.Tensor  # (B,) float
    frequency: torch.Tensor  # (B,) float
    rep: torch.Tensor  # (B,) float: repetition_penalty - 1
    min_tokens: torch.Tensor  # (B,) long
    generated: torch.Tensor  # (B,) long: tokens emitted so far


def start(
    params: Sequence[SamplingParams],
    prompts: Sequence[list[int]],
    outputs: Sequence[list[int]],
    eos_ids: set[int],
    vocab: int,
    device: torch.device,
) -> LogitControls | None:
    """The controls of fresh rows (a new batch), or None when no row has one; `outputs`: what each
    row has emitted already (a request resumed after a preemption)."""
    if not any(p.has_logit_controls for p in params):
        return None
    b = len(params)
    counts = torch.zeros(b, vocab)
    prompt = torch.zeros(b, vocab, dtype=torch.bool)
    bias = torch.zeros(b, vocab)
    stops = torch.zeros(b, vocab, dtype=torch.bool)
    for i, (p, ids, out) in enumerate(zip(params, prompts, outputs)):
        counts[i].index_add_(0, torch.tensor(out, dtype=torch.long), torch.ones(len(out)))
        prompt[i, torch.tensor(ids, dtype=torch.long)] = True
        for token, value in (p.logit_bias or {}).items():
            if token < vocab:
                bias[i, token] = value
        ends = [t for t in [*([] if p.ignore_eos else eos_ids), *p.stop_token_ids] if t < vocab]
        stops[i, torch.tensor(ends, dtype=torch.long)] = True

    def floats(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device)

    return LogitControls(
        counts=counts.to(device),
        prompt=prompt.to(device),
        bias=bias.to(device),
        stops=stops.to(device),
        presence=floats([p.presence_penalty for p in params]),
        frequency=floats([p.frequency_penalty for p in params]),
        rep=floats([p.repetition_penalty - 1 for p in params]),
        min_tokens=torch.tensor([p.min_tokens for p in params], dtype=torch.long, device=device),
        generated=torch.tensor([len(out) for out in outputs], dtype=torch.long, device=device),
    )


def record(controls: LogitControls | None, emitted: list[list[int]]) -> None:
    """Count what each row emitted this step (rows aligned with the batch)."""
    if controls is None or not any(emitted):
        return
    device = controls.counts.device
    rows = torch.tensor([i for i, out in enumerate(emitted) for _ in out], dtype=torch.long)
    tokens = torch.tensor([t for out in emitted for t in out], dtype=torch.long)
    vocab = controls.counts.shape[1]
    keep = tokens < vocab
    controls.counts = controls.counts.index_put(
        (rows[keep].to(device), tokens[keep].to(device)), torch.ones(int(keep.sum()), device=device), accumulate=True
    )
    added = torch.tensor([len(out) for out in emitted], dtype=torch.long, device=device)
    controls.generated = controls.generated + added


def apply(
    controls: LogitControls | None,
    logits: torch.Tensor,
    offsets: torch.Tensor | None = None,
    within: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits (B, T, V) as the controls reshape them (the same tensor when no row has any).
    `offsets` (B, T): how many tokens the row will have emitted before the one position t picks
    (for min_tokens; default 0: one position per row); `within` (B, T, V): counts of tokens emitted
    earlier in this pass."""
    if controls is None:
        return logits
    if offsets is None:
        offsets = torch.zeros(logits.shape[:2], dtype=torch.long, device=logits.device)
    c = controls
    counts = c.counts[:, None]
    if within is not None:
        counts = counts + within
    x = logits.float() + c.bias[:, None]
    rep = (1 + c.rep)[:, None, None]
    seen = (counts > 0) | c.prompt[:, None]
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    x = x - c.frequency[:, None, None] * counts - c.presence[:, None, None] * (counts > 0)
    early = (c.generated[:, None] + offsets) < c.min_tokens[:, None]  # (B, T)
    return x.masked_fill(early[..., None] & c.stops[:, None], float("-inf"))
