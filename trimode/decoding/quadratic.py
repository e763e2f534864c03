"""Quadratic self-speculation: one forward verifies a row's drafts and drafts its next block for
every acceptance length it may turn out to have (NVIDIA's SBD "quadratic" inference, TiDAR-style).

A row's pass over its cached prefix of length L holds b(b+1) tokens, the chain first:
- the chain: the seed and the b-1 drafts, d_0..d_{b-1} at positions L..L+b-1, causal among
  themselves, draft LoRA off: exactly the verify pass of linear self-spec (and of AR);
- group g (g = 0..b-1): b masks at positions L+g+1..L+g+b, draft LoRA on, seeing the prefix,
  chain tokens 0..g and each other (bidirectional in the group), nothing else. It is the draft the
  row needs if the verifier keeps exactly chain tokens 0..g.

Acceptance is linear self-spec's (`selfspec.verify`: greedy agreement, or rejection sampling at
temperature > 0). With `a` drafts accepted, chain tokens 0..a join the KV prefix (the chain lies
first, so this is `commit(counts)`; the masks' slots are scratch), and the next chain is the bonus
token followed by group a's last b-1 predictions. Group a's first mask sits at the bonus token's
position: the verifier decides that token, and the drafts after it were made without knowing it,
which is why a quadratic cycle may accept fewer than a linear one.

Exactness at temperature > 0: the next drafts are drawn from group a's marginals, which condition
on the prefix and chain 0..a only, never on the bonus token or on each other, so each d_i is a draw
from a fixed q_i independent of the acceptance test, as `selfspec`'s argument needs.

A row's first drafts come from its prefill, as in NVIDIA's reference: b masks after its context
(`prefill_tail`), seeing the context and each other, are group "-1": the first sits at the seed's
position, the others draft the first block. So a request costs one forward for its prefill and one
per cycle, with no draft-only pass. A row prefilled without them (a prompt fed in chunks), or
whose grammar needs its drafts on the host before its first pass, starts `blind`: its first
chain is [seed, MASK...], none accepted; that pass emits the verifier's token and drafts.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from trimode import logit_controls
from trimode.decoding.base import DecodeBatch, Decoder, Emission, Forward, keep_emitted
from trimode.decoding.selfspec import controlled, draw_drafts, verify
from trimode.rows import Rows
from trimode.sampling_params import Mode, SamplingParams


@dataclass
class QuadraticRows(Rows):
    drafts: torch.Tensor  # (B, b-1) each row's current drafts
    # (B, b-1, V) the distributions sampled rows drew their drafts from; None until one does
    # (greedy rows read zeros, as in `selfspec.SelfSpecRows`).
    q: torch.Tensor | None
    blind: torch.Tensor  # (B,) bool: the row's drafts are placeholders (its first pass)
    # Host: each row's drafts, read back only when a row has a structured-output grammar.
    host_drafts: list[list[int]]


@cache
def layout(b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pass's shape for block length b, built once: each token's position after the prefix
    (T,), which tokens each one sees (T, T) bool, and where the draft LoRA is on (T,) bool;
    T = b(b+1), the chain's b tokens first, then the b groups of b masks."""
    width = b * (b + 1)
    group = torch.arange(width, device=device) // b - 1  # -1 on the chain, else the group's index
    slot = torch.arange(width, device=device) % b  # index in the chain, or in the group
    chain = group < 0
    offsets = torch.where(chain, slot, group + 1 + slot)
    # Chain token i sees chain 0..i; a mask of group g sees chain 0..g and all of group g.
    upto = torch.where(chain, slot, group)  # the last chain index a token sees
    sees_chain = chain[None, :] & (slot[None, :] <= upto[:, None])
    same_group = ~chain[:, None] & (group[:, None] == group[None, :])
    return offsets, sees_chain | same_group, ~chain


class QuadraticSelfSpecDecoder(Decoder):
    mode = "selfspec"
    stat_name = "tokens_per_cycle"

    @classmethod
    def check(cls, params: SamplingParams) -> None:
        """A kind of self-spec (`spec`), which drafts at least one token: b >= 2."""
        if params.mode != Mode.SELFSPEC:
            raise ValueError(
                f"SamplingParams.spec='quadratic' is a kind of mode 'selfspec'; got mode {Mode(params.mode).value!r}"
            )
        if params.block_length < 2:
            raise ValueError(
                "SamplingParams.block_length must be an integer >= 2 with spec='quadratic'; "
                f"got {params.block_length!r}"
            )

    def __init__(self, block_length: int) -> None:
        if block_length < 2:
            raise ValueError(f"quadratic self-speculation needs block_length >= 2; got {block_length}")
        self.block_length = self.prefill_tail = block_length
        self.width = block_length * (block_length + 1)

    def start(self, batch: DecodeBatch) -> None:
        n, device, b = batch.size, batch.seeds.device, self.block_length
        masks = torch.full((n, b - 1), batch.mask_id, dtype=torch.long, device=device)
        state = QuadraticRows(masks, None, torch.ones(n, dtype=torch.bool, device=device), [[] for _ in range(n)])
        batch.decoding = state
        if batch.prefill_drafts is None:
            return
        # Draft j proposes output token `generated + j` (the seed is counted already).
        after = torch.arange(b - 1, device=device).expand(n, -1)
        logits = logit_controls.apply(batch.controls, batch.prefill_drafts[:, : b - 1], after)
        drafts, state.q = draw_drafts(batch, logits, [True] * n)
        # A grammar masks each verify position after the drafts before it, read on the host: a
        # constrained row has its drafts there only after a pass has sent them.
        state.blind = torch.tensor([m is not None for m in batch.grammar], device=device)
        state.drafts = torch.where(state.blind[:, None], masks, drafts)

    def plan(self, batch: DecodeBatch) -> Forward:
        b, s = self.block_length, batch.state(QuadraticRows)
        offsets, pattern, lora = layout(b, batch.seeds.device)
        masks = torch.full((batch.size, b * b), batch.mask_id, dtype=torch.long, device=batch.seeds.device)
        tokens = torch.cat([batch.seeds[:, None], s.drafts, masks], 1)
        return Forward(
            "draft+verify",
            tokens,
            causal=True,
            use_draft_lora=lora[None].expand(batch.size, -1),
            offsets=offsets,
            pattern=pattern,
        )

    def accept(self, batch: DecodeBatch, logits: torch.Tensor) -> Emission:
        b, s, n = self.block_length, batch.state(QuadraticRows), batch.size
        every = [True] * n
        chain = logits[:, :b]
        packed, bonus = verify(
            batch, controlled(batch, chain, s.drafts, s.host_drafts, every), s.drafts, s.q, every, s.blind
        )
        accepted = packed[:, 0]
        # The verifier's (AR) log-probability of each emitted token: the accepted drafts, then the
        # bonus at position `accepted`.
        emitted = torch.cat([s.drafts, bonus[:, None]], 1).scatter(1, accepted[:, None], bonus[:, None])
        logprobs = batch.logprobs_of(logits[:, :b], emitted)
        # The next drafts: group `accepted`'s masks after its first (which sits at the bonus's
        # position). Draft j proposes the row's output token `generated + accepted + 1 + j`.
        rows = torch.arange(n, device=logits.device)
        proposals = logits[:, b:].view(n, b, b, -1)[rows, accepted, 1:]  # (B, b-1, V)
        after = accepted[:, None] + 1 + torch.arange(b - 1, device=logits.device)
        s.drafts, q = draw_drafts(batch, logit_controls.apply(batch.controls, proposals, after), every)
        s.q = q if q is not None else s.q
        s.blind = torch.zeros_like(s.blind)
        batch.seeds = bonus
        constrained = batch.constrained
        if constrained:  # the new drafts too, for the next pass's grammar masks
            packed = torch.cat([packed, s.drafts], 1)

        def read(rows: list[list[int]]) -> list[list[int]]:
            if constrained:
                s.host_drafts = [r[b + 1 :] for r in rows]  # after [accepted, bonus, drafts]
            emitted = [r[2 : 2 + r[0]] + [r[1]] for r in rows]
            batch.record([len(e) for e in emitted])
            return emitted

        return Emission(packed, read, logprobs, keep=keep_emitted)
