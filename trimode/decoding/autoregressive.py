"""AR mode: one causal forward per token, KV written every step."""

from __future__ import annotations

import torch

from trimode.decoding.base import DecodeBatch, Decoder, Emission, Forward


class AutoregressiveDecoder(Decoder):
    mode = "ar"

    def plan(self, batch: DecodeBatch) -> Forward:
        return Forward("ar", batch.seeds[:, None], causal=True)

    def accept(self, batch: DecodeBatch, logits: torch.Tensor) -> Emission:
        batch.seeds = batch.sampler.pick(batch.controlled(logits))[:, 0]
        return Emission.seeds(batch.seeds, batch.logprobs_of(logits, batch.seeds[:, None]))
