"""Logit controls that read a request's tokens so far (vLLM's logits processors): OpenAI's presence
and frequency penalties, the repetition penalty (CTRL, Keskar et al. 2019, applied as Hugging Face
and vLLM do), `logit_bias` and `min_tokens`. They reshape the logits that every pick reads, in
every mode; the log-probabilities reported stay the model's own.

Their per-row state is (B, V) tensors in the batch's state, so it follows rows as they join and
leave (`DecodeBatch._select` / `extend`; a row without controls reads zeros, which switch every
control off: the repetition penalty is kept as r - 1). The host adds each step's emitted tokens
(`record`): a copy to the device, no read back. A pass whose positions emit several tokens in
sequence (self-spec verify) passes `within`, the counts of the tokens before each position in the
pass, so position i is penalised exactly as an AR step after those tokens would be.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from trimode.sampling_params import SamplingParams


def start(
    state: dict[str, torch.Tensor],
    params: Sequence[SamplingParams],
    prompts: Sequence[list[int]],
    outputs: Sequence[list[int]],
    eos_ids: set[int],
    vocab: int,
    device: torch.device,
) -> None:
    """The controls of fresh rows (a new batch), when any row has one; `outputs`: what each row
    has emitted already (a request resumed after a preemption)."""
    if not any(p.has_logit_controls for p in params):
        return
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
    per_row = {
        "ctl_presence": [p.presence_penalty for p in params],
        "ctl_frequency": [p.frequency_penalty for p in params],
        "ctl_rep": [p.repetition_penalty - 1 for p in params],
        "ctl_min": [p.min_tokens for p in params],
        "ctl_generated": [len(out) for out in outputs],
    }
    state.update(ctl_counts=counts.to(device), ctl_prompt=prompt.to(device), ctl_bias=bias.to(device))
    state["ctl_stops"] = stops.to(device)
    for key, values in per_row.items():
        dtype = torch.long if key in ("ctl_min", "ctl_generated") else torch.float32
        state[key] = torch.tensor(values, dtype=dtype, device=device)


def active(state: dict[str, torch.Tensor]) -> bool:
    """Whether a row of the batch has logit controls."""
    return "ctl_counts" in state


def record(state: dict[str, torch.Tensor], emitted: list[list[int]]) -> None:
    """Count what each row emitted this step (rows aligned with the batch)."""
    if not active(state) or not any(emitted):
        return
    device = state["ctl_counts"].device
    rows = torch.tensor([i for i, out in enumerate(emitted) for _ in out], dtype=torch.long)
    tokens = torch.tensor([t for out in emitted for t in out], dtype=torch.long)
    vocab = state["ctl_counts"].shape[1]
    keep = tokens < vocab
    state["ctl_counts"] = state["ctl_counts"].index_put(
        (rows[keep].to(device), tokens[keep].to(device)), torch.ones(int(keep.sum()), device=device), accumulate=True
    )
    added = torch.tensor([len(out) for out in emitted], dtype=torch.long, device=device)
    state["ctl_generated"] = state["ctl_generated"] + added


def apply(
    state: dict[str, torch.Tensor],
    logits: torch.Tensor,
    offsets: torch.Tensor | None = None,
    within: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits (B, T, V) as the controls reshape them (the same tensor when no row has any).
    `offsets` (B, T): how many tokens the row will have emitted before the one position t picks
    (for min_tokens; default 0: one position per row); `within` (B, T, V): counts of tokens emitted
    earlier in this pass."""
    if not active(state):
        return logits
    if offsets is None:
        offsets = torch.zeros(logits.shape[:2], dtype=torch.long, device=logits.device)
    counts = state["ctl_counts"][:, None]
    if within is not None:
        counts = counts + within
    x = logits.float() + state["ctl_bias"][:, None]
    rep = (1 + state["ctl_rep"])[:, None, None]
    seen = (counts > 0) | state["ctl_prompt"][:, None]
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    x = x - state["ctl_frequency"][:, None, None] * counts - state["ctl_presence"][:, None, None] * (counts > 0)
    early = (state["ctl_generated"][:, None] + offsets) < state["ctl_min"][:, None]  # (B, T)
    return x.masked_fill(early[..., None] & state["ctl_stops"][:, None], float("-inf"))
