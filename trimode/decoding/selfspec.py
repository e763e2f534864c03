"""Linear self-speculation (design doc section 5): a bidirectional draft pass fills a block of masks,
a causal verify pass over [seed, drafts] checks it; the agreeing prefix plus one bonus token is kept.

At temperature 0 acceptance is exact argmax agreement, so the output equals AR greedy. At
temperature > 0 we use speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023):
draft token d_i ~ q_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); the first rejection is
replaced by a sample from norm(max(0, p_i - q_i)), and if all drafts pass the bonus comes from p.
The emitted tokens then follow the AR (verifier) distribution p exactly, including temperature,
top-k and top-p, which shape both p and q. q_i here is the draft pass's marginal at position i given
the prefix only; the argument needs only that d_i is drawn from q_i independently of the test.

Draft and verify are two engine steps; each row alternates on its own, so a row that has just
joined drafts while its neighbours verify, in the same forward (per-row causal flag and draft LoRA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trimode.decoding.base import DecodeBatch, Decoder, Emission, Forward, keep_counts, keep_emitted, mixed, rows_where
from trimode.rows import Rows


@dataclass
class SelfSpecRows(Rows):
    drafts: torch.Tensor  # (B, b-1) each row's current drafts
    # (B, b-1, V) the draft distributions sampled rows drew from; None until one does. Greedy rows
    # read zeros: a draft is then accepted exactly when the verifier's one-hot p gives it mass,
    # i.e. when it is the verifier's argmax.
    q: torch.Tensor | None
    drafting: list[bool]  # host: which rows draft next (the rest verify)
    # Host: each row's drafts, read back only when a row has a structured-output grammar (the
    # verify pass then masks each position after the drafts before it).
    host_drafts: list[list[int]]


class SelfSpecDecoder(Decoder):
    mode = "selfspec"
    stat_name = "tokens_per_cycle"

    def __init__(self, block_length: int) -> None:
        self.block_length = self.width = block_length

    def start(self, batch: DecodeBatch) -> None:
        drafts = torch.zeros(batch.size, max(self.block_length - 1, 0), dtype=torch.long, device=batch.seeds.device)
        batch.decoding = SelfSpecRows(drafts, None, [True] * batch.size, [[] for _ in range(batch.size)])

    def at_boundary(self, batch: DecodeBatch) -> list[bool]:
        """Rows about to draft: their last cycle is verified, the next not begun."""
        return [True] * batch.size if self.block_length == 1 else list(batch.state(SelfSpecRows).drafting)

    def plan(self, batch: DecodeBatch) -> Forward:
        if self.block_length == 1:  # nothing to draft: a plain causal step
            return Forward("verify", batch.seeds[:, None], causal=True)
        s, device = batch.state(SelfSpecRows), batch.seeds.device
        masks = torch.full_like(s.drafts, batch.mask_id)
        kind, drafting = mixed(s.drafting, ("verify", "draft"), device)
        causal: torch.Tensor | bool
        if isinstance(drafting, torch.Tensor):
            tail, causal = torch.where(drafting[:, None], masks, s.drafts), ~drafting
        else:
            tail, causal = (masks if drafting else s.drafts), not drafting
        return Forward(kind, torch.cat([batch.seeds[:, None], tail], 1), causal=causal, use_draft_lora=drafting)

    def accept(self, batch: DecodeBatch, logits: torch.Tensor) -> Emission:
        if self.block_length == 1:
            batch.seeds = batch.sampler.pick(batch.controlled(logits))[:, 0]
            batch.record([1] * batch.size)
            return Emission.seeds(batch.seeds, batch.logprobs_of(logits, batch.seeds[:, None]))
        s = batch.state(SelfSpecRows)
        was_drafting = s.drafting
        verifying = [not d for d in was_drafting]
        s.drafting = verifying
        raw, logits = logits, controlled(batch, logits, s.drafts, s.host_drafts, verifying)
        constrained = batch.constrained
        if not any(verifying):  # a draft pass: none of its K/V joins the prefix
            self._draft(batch, logits, was_drafting)
            none = keep_counts([0] * batch.size)
            if not constrained:  # no transfer
                return Emission(batch.seeds.new_zeros(batch.size, 0), lambda rows: [[] for _ in rows], keep=none)

            def file_drafts(rows: list[list[int]]) -> list[list[int]]:
                s.host_drafts = rows
                return [[] for _ in rows]

            return Emission(s.drafts, file_drafts, keep=none)
        packed, bonus = verify(batch, logits, s.drafts, s.q, verifying)  # first: the draft step edits the logits
        # The verifier's (AR) log-probability of each emitted token: the accepted drafts, then the
        # bonus at position `accepted` (packed[:, 0]). Drafting rows emit nothing.
        emitted = torch.cat([s.drafts, bonus[:, None]], 1).scatter(1, packed[:, :1], bonus[:, None])
        logprobs = batch.logprobs_of(raw, emitted)
        batch.seeds = torch.where(torch.tensor(verifying, device=bonus.device), bonus, batch.seeds)
        self._draft(batch, logits, was_drafting)

        if constrained:  # the new drafts too, for the next verify's masks
            packed = torch.cat([packed, s.drafts], 1)

        def read(rows: list[list[int]]) -> list[list[int]]:
            # Per verifying row: its accepted drafts and the bonus; drafting rows emit nothing.
            if constrained:
                width = self.block_length + 1  # the new drafts follow [accepted, bonus, drafts]
                s.host_drafts = [r[width:] if d else o for r, d, o in zip(rows, was_drafting, s.host_drafts)]
            emitted = [r[2 : 2 + r[0]] + [r[1]] if v else [] for r, v in zip(rows, verifying)]
            batch.record([len(e) for e in emitted], rows=verifying)
            return emitted

        return Emission(packed, read, logprobs, keep=keep_emitted)  # a drafting row emits none

    def _draft(self, batch: DecodeBatch, logits: torch.Tensor, rows: list[bool]) -> None:
        """Fill the masks of `rows` from their bidirectional pass over [seed, MASK...]."""
        if not any(rows):
            return
        s = batch.state(SelfSpecRows)
        drafts, q = draw_drafts(batch, logits[:, 1:], rows)
        chosen = torch.tensor(rows, device=logits.device)
        if q is not None:
            s.q = q if s.q is None else torch.where(chosen[:, None, None], q, s.q)
        s.drafts = torch.where(chosen[:, None], drafts, s.drafts)


def controlled(
    batch: DecodeBatch, logits: torch.Tensor, drafts: torch.Tensor, host_drafts: list[list[int]], verifying: list[bool]
) -> torch.Tensor:
    """A pass's logits (B, b, V) over [seed, drafts or masks] under the rows' logit controls and
    grammars. A verifying row's position i picks its output token `generated + i` after drafts
    1..i, so it sees their counts: each position exactly as the AR step there would (so self-spec
    == AR under penalties). A drafting row's position p proposes output token `generated + p - 1`,
    from the counts so far."""
    b = logits.shape[1]
    offsets = within = None
    paths: list[list[list[int] | None]] | None = None
    if batch.controls is not None:
        positions = torch.arange(b, device=logits.device)
        ver = torch.tensor(verifying, device=logits.device)
        offsets = torch.where(ver[:, None], positions, positions - 1)
        before = F.one_hot(drafts, logits.shape[-1]).float().cumsum(1)  # (B, b-1, V)
        within = torch.cat([torch.zeros_like(before[:, :1]), before], 1) * ver[:, None, None]
    if batch.constrained:
        # Verify position i: after drafts 1..i. A draft pass masks only its first draft (after
        # the tokens so far); the later ones are proposals the verify checks.
        drafting: list[list[int] | None] = [None, [], *[None] * (b - 2)]
        paths = [[d[:i] for i in range(b)] if v else drafting for d, v in zip(host_drafts, verifying)]
    return batch.controlled(logits, offsets, within, paths)


def draw_drafts(batch: DecodeBatch, logits: torch.Tensor, rows: list[bool]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drafts (B, n) from masked positions' own-position logits (B, n, V): the argmax, or for
    sampled rows a draw from q, which is returned too (B, n, V) (None when every row is greedy).
    Only `rows` draw random numbers."""
    logits, sampler = batch.bidirectional_logits(logits), batch.sampler
    if sampler.all_greedy:
        return logits.argmax(-1), None
    q = sampler.probs(logits)
    return sampler.sample(q, rows=rows_where(rows)), q


def verify(
    batch: DecodeBatch,
    logits: torch.Tensor,
    drafts: torch.Tensor,
    q: torch.Tensor | None,
    rows: list[bool],
    blind: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept the agreeing prefix of the drafts (B, b-1) of `rows` under the verifier's logits
    (B, b, V) over [seed, drafts], and a bonus token; `q` (B, b-1, V): the distributions sampled
    drafts were drawn from (None: every draft greedy); `blind` (B,): rows whose drafts are
    placeholders, none accepted. Returns, per row, [accepted, bonus, drafts...] (B, b + 1) for
    the step's transfer, and the bonus tokens (B,)."""
    b, sampler = logits.shape[1], batch.sampler
    # The block length is fixed (not shrunk to the budget) so a row's drafts, and hence its
    # statistics, do not depend on what else is in the batch; a row never accepts past its budget.
    cap = batch.remaining - 1  # (B,) most drafts a row may still accept
    if sampler.all_greedy:
        target = logits.argmax(-1)  # (B, b): target[:, i] is the AR choice for position i+1
        agreed = (target[:, :-1] == drafts).long().cumprod(1).sum(1)  # (B,) leading agreements
        if blind is not None:
            agreed = agreed * ~blind
        accepted = torch.minimum(agreed, cap)
        bonus = target.gather(1, accepted[:, None])[:, 0]
    else:
        draw = rows_where(rows)  # only verifying rows draw random numbers
        p = sampler.probs(logits)  # (B, b, V)
        q = q if q is not None else torch.zeros_like(p[:, :-1])  # (B, b-1, V); None: only greedy drafts
        p_d = p[:, :-1].gather(-1, drafts[..., None])[..., 0]
        q_d = q.gather(-1, drafts[..., None])[..., 0]
        agreed = (sampler.uniform(b - 1, draw) * q_d < p_d).long().cumprod(1).sum(1)  # u < p/q, no division
        if blind is not None:
            agreed = agreed * ~blind
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
        bonus = torch.where(agreed > accepted, next_draft, sampler.sample(residual, draw)[:, 0])
    return torch.cat([accepted[:, None], bonus[:, None], drafts], 1), bonus
