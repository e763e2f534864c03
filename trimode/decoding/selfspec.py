"""Linear self-speculation (design doc section 5): a bidirectional draft pass fills a block of masks,
a causal verify pass over [seed, drafts] checks it; the agreeing prefix plus one bonus token is kept.

At temperature 0 acceptance is exact argmax agreement, so the output equals AR greedy. At
temperature > 0 we use speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023):
draft token d_i ~ q_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); the first rejection is
replaced by a sample from norm(max(0, p_i - q_i)), and if all drafts pass the bonus comes from p.
The emitted tokens then follow the AR (verifier) distribution p exactly, including temperature,
top-k and top-p, which shape both p and q. q_i here is the draft pass's marginal at position i given
the prefix only; the argument needs only that d_i is drawn from q_i independently of the test.
"""

from __future__ import annotations

import torch

from trimode.decoding.base import DecodeBatch, Decoder


class SelfSpecDecoder(Decoder):
    mode = "selfspec"
    stat_name = "tokens_per_cycle"

    def __init__(self, block_length: int) -> None:
        self.block_length = block_length

    def step(self, batch: DecodeBatch) -> list[list[int]]:
        # The block length is fixed (not shrunk to the budget) so a row's drafts, and hence its
        # statistics, do not depend on what else is in the batch; a row never accepts past its budget.
        b = self.block_length
        cap = (batch.remaining - 1).to(batch.seeds.device)  # (B,) most drafts a row may still accept
        if b == 1:  # nothing to draft: a plain causal step
            logits = batch.forward("verify", batch.seeds[:, None], causal=True)
            batch.kv.commit()
            batch.seeds = batch.sampler.pick(logits)[:, 0]
            batch.record(torch.ones(batch.size))
            return [[t] for t in batch.seeds.tolist()]
        masks = torch.full((batch.size, b - 1), batch.mask_id, dtype=torch.long, device=batch.seeds.device)
        draft_logits = batch.forward(
            "draft", torch.cat([batch.seeds[:, None], masks], 1), causal=False, use_draft_lora=True
        )
        draft_logits = batch.bidirectional_logits(draft_logits[:, 1:])  # (B, b-1, V): own-position predictions
        sampler = batch.sampler
        if sampler.all_greedy:
            drafts = draft_logits.argmax(-1)  # (B, b-1)
            verify_logits = batch.forward("verify", torch.cat([batch.seeds[:, None], drafts], 1), causal=True)
            target = verify_logits.argmax(-1)  # (B, b): target[:, i] is the AR choice for position i+1
            agreed = (target[:, :-1] == drafts).long().cumprod(1).sum(1)  # (B,) leading agreements
            accepted = torch.minimum(agreed, cap)
            bonus = target.gather(1, accepted[:, None])[:, 0]
        else:
            q = sampler.probs(draft_logits)
            drafts = sampler.sample(q)
            verify_logits = batch.forward("verify", torch.cat([batch.seeds[:, None], drafts], 1), causal=True)
            p = sampler.probs(verify_logits)  # (B, b, V)
            p_d = p[:, :-1].gather(-1, drafts[..., None])[..., 0]
            q_d = q.gather(-1, drafts[..., None])[..., 0]
            agreed = (sampler.uniform(b - 1) * q_d < p_d).long().cumprod(1).sum(1)  # u < p/q without dividing
            accepted = torch.minimum(agreed, cap)
            # The token after the accepted drafts: where the budget cut an accepted run, the next
            # accepted draft itself (it is already a sample from p); where a draft was rejected, a
            # sample from the residual; after all b-1 drafts, a plain sample from p.
            rejected = (agreed == accepted) & (accepted < b - 1)
            q_padded = torch.cat([q, torch.zeros_like(q[:, :1])], 1)
            at = accepted[:, None, None].expand(-1, 1, p.shape[-1])
            p_at = p.gather(1, at)
            residual = (p_at - q_padded.gather(1, at) * rejected[:, None, None]).clamp_(min=0)
            # p == q exactly leaves no residual mass; then any sample from p is correct.
            residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_at)
            next_draft = drafts.gather(1, accepted.clamp(max=b - 2)[:, None])[:, 0]
            bonus = torch.where(agreed > accepted, next_draft, sampler.sample(residual)[:, 0])
        # Keep the KV of the seed and the accepted drafts; the rest of the verify pass is cropped.
        batch.kv.commit(accepted + 1)
        batch.seeds = bonus
        batch.record(accepted + 1)
        return [d[:n] + [s] for d, n, s in zip(drafts.tolist(), accepted.tolist(), bonus.tolist())]
