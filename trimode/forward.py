"""`Forward`: one pass over a batch, as a decoder plans it and the model runner runs it. Below both:
the runner reads passes without knowing decoders, and decoders describe passes without knowing
how they run (eager, compiled, CUDA graphs, tensor-parallel)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Forward:
    """One forward over every row of a batch, as a decoder plans it."""

    kind: str  # what it is, for timings: "ar", "denoise", "commit", "draft", "verify", "draft+verify", ...
    tokens: torch.Tensor  # (B, T) after each row's cached prefix
    causal: torch.Tensor | bool  # (B,) per row, or one value for all rows
    use_draft_lora: torch.Tensor | bool = False  # (B,) per row, (B, T) per position, or one value
    logit_index: torch.Tensor | None = None  # (B,) the one position whose logits are wanted, or (B, K)
    num_fed: list[int] | None = None  # per row, the real tokens of a right-padded forward (None: all T)
    # A pass that lays several continuations side by side (quadratic self-spec): each token's
    # position after the row's prefix (T,), and which of the pass's tokens each one sees (T, T),
    # or per row (B, T, T), bool, in place of `causal`. None: positions 0..T-1, causal or
    # bidirectional per `causal`.
    offsets: torch.Tensor | None = None
    pattern: torch.Tensor | None = None
