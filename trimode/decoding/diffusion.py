"""Block diffusion (design doc section 5; Fast-dLLM-style confidence thresholding).

Per block: [seed, MASK x (b-1)] is denoised by bidirectional passes over the cached prefix (KV not
written). Each pass reveals, per row, its most confident masked position plus every masked position
whose confidence is at least the threshold (threshold None: the most confident one only). A row is
done when no mask is left within its budget (max_tokens), or when it revealed an EOS with no mask to
its left; rows decode independently (a done row waits, unchanged and uncounted, while the others
denoise). One causal commit pass then writes the block's KV; its last logits give the next seed.

As NVIDIA's reference: a candidate's confidence is its probability under the full softmax of the
pass's logits, [MASK] included, and the test is `>=`. Unlike the reference, [MASK] itself is never
a candidate: a revealed position is final, and the reference can write [MASK] back and return it.
So reveal decisions equal the reference's wherever the reference keeps [MASK] out of its output.
"""

from __future__ import annotations

import torch

from trimode.decoding.base import DecodeBatch, Decoder


class DiffusionDecoder(Decoder):
    mode = "diffusion"
    stat_name = "denoise_passes_per_block"

    def __init__(self, block_length: int, threshold: float | None) -> None:
        self.block_length = block_length
        self.threshold = threshold

    def step(self, batch: DecodeBatch) -> list[list[int]]:
        device = batch.seeds.device
        # Blocks always have the configured length (as in the reference), so a row decodes the same
        # alone or batched; a row whose budget ends inside the block stops once its budget is revealed.
        b = self.block_length
        positions = torch.arange(b, device=device)
        in_budget = positions < (batch.remaining.to(device)[:, None] + 1)  # (B, b); the seed is position 0
        block = torch.full((batch.size, b), batch.mask_id, dtype=torch.long, device=device)
        block[:, 0] = batch.seeds
        is_masked = torch.ones_like(block, dtype=torch.bool)
        is_masked[:, 0] = False
        done = ~(is_masked & in_budget).any(1)
        eos_done = torch.zeros_like(done)
        passes = torch.zeros(batch.size, dtype=torch.long, device=device)
        while not bool(done.all()):
            active = ~done
            logits = batch.forward("denoise", block, causal=False, rows=active)  # (B, b, V)
            normalizer = logits.float().logsumexp(-1)  # (B, b): the full softmax's, [MASK] included
            logits = batch.bidirectional_logits(logits)
            # Only rows still denoising draw random numbers, so a seeded row samples the same alone
            # or beside rows that take more passes.
            active_rows = active.nonzero()[:, 0].tolist() if not batch.sampler.all_greedy else None
            candidates = batch.sampler.pick(logits, rows=active_rows)  # (B, b)
            # The candidate's untempered probability, whether picked greedily or sampled (as LLaDA
            # and Fast-dLLM do), so the reveal schedule does not depend on temperature or top-k/top-p.
            confidence = (logits.gather(-1, candidates[..., None])[..., 0].float() - normalizer).exp()
            open_slots = is_masked & active[:, None]
            confidence = confidence.masked_fill(~open_slots, -1.0)
            if self.threshold is None:
                reveal = torch.zeros_like(open_slots)
            else:
                reveal = (confidence >= self.threshold) & open_slots
            reveal.scatter_(1, confidence.argmax(1, keepdim=True), True)  # the most confident, always
            reveal &= open_slots
            block = torch.where(reveal, candidates, block)
            is_masked &= ~reveal
            passes += active.long()
            is_eos = torch.isin(block, batch.eos_ids) & ~is_masked & batch.stop_on_eos[:, None]
            is_eos[:, 0] = False
            first_eos = torch.where(is_eos.any(1), is_eos.long().argmax(1), b)
            eos_done = is_eos.any(1) & ~(is_masked & (positions < first_eos[:, None])).any(1)
            done = ~(is_masked & in_budget).any(1) | eos_done
        batch.record(passes)
        emitted = [row[1:] for row in block.tolist()]
        needs_commit = ~eos_done.cpu() & (batch.remaining > b - 1)
        if bool(needs_commit.any()):
            logits = batch.forward("commit", block, causal=True, rows=needs_commit)
            batch.kv.commit()
            batch.seeds = batch.sampler.pick(logits[:, -1:])[:, 0]
            for row, seed in zip(emitted, batch.seeds.tolist()):
                row.append(seed)
        return emitted
