"""AR mode: one causal forward per token, KV written every step."""

from __future__ import annotations

from trimode.decoding.base import DecodeBatch, Decoder


class AutoregressiveDecoder(Decoder):
    mode = "ar"

    def step(self, batch: DecodeBatch) -> list[list[int]]:
        logits = batch.forward("ar", batch.seeds[:, None], causal=True)  # (B, 1, V)
        batch.kv.commit()
        batch.seeds = batch.sampler.pick(logits)[:, 0]
        return [[t] for t in batch.seeds.tolist()]
