"""Block diffusion (design doc section 5; Fast-dLLM-style confidence thresholding).

Per block: [seed, MASK x (b-1)] is denoised by bidirectional passes over the cached prefix (KV not
written). Each pass reveals, per row, its most confident masked position plus every masked position
whose confidence is at least the threshold (threshold None: the most confident one only). A row's
block is done when no mask is left within its budget (max_tokens), or when it revealed an EOS with
no mask to its left; its tokens are emitted then. One causal commit pass writes the block's KV; its
last logits give the next seed. The block, its masks and its pass count are per-row state, so each
engine step is one forward in which every row takes its own next pass: rows still denoising
(bidirectional, nothing committed) beside rows committing (causal, the block committed).

As NVIDIA's reference: a candidate's confidence is its probability under the full softmax of the
pass's logits, [MASK] included, and the test is `>=`. Unlike the reference, [MASK] itself is never
a candidate: a revealed position is final, and the reference can write [MASK] back and return it.
So reveal decisions equal the reference's wherever the reference keeps [MASK] out of its output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trimode.decoding.base import (
    DecodeBatch,
    Decoder,
    Emission,
    Forward,
    keep_counts,
    logprob_table,
    mixed,
    rows_where,
)
from trimode.rows import Rows
from trimode.sampling_params import MAX_LOGPROBS, SamplingParams


@dataclass
class DiffusionRows(Rows):
    block: torch.Tensor  # (B, b) the row's block: seed, revealed tokens, masks
    masked: torch.Tensor  # (B, b) bool: positions still masked
    in_budget: torch.Tensor  # (B, b) bool: positions within the row's max_tokens
    fresh: torch.Tensor  # (B,) bool: a new block, whose budget the next plan reads
    passes: torch.Tensor  # (B,) long: denoise passes of the current block
    # (B, b, E) the logprob entry each revealed position got at its reveal; None until a row asks.
    logprobs: torch.Tensor | None
    # Host: which rows commit their block in the next forward (the rest denoise).
    committing: list[bool]


class DiffusionDecoder(Decoder):
    mode = "diffusion"
    stat_name = "denoise_passes_per_block"

    @classmethod
    def check(cls, params: SamplingParams) -> None:
        """No grammar: diffusion reveals a block's positions in any order."""
        if params.structured is not None:
            raise ValueError(
                "structured output needs mode ar, selfspec or auto (without auto_lossy): diffusion reveals a "
                "block's positions in any order, which a left-to-right grammar cannot check"
            )

    def __init__(self, block_length: int, threshold: float | None) -> None:
        self.block_length = self.width = block_length
        self.threshold = threshold

    def at_boundary(self, batch: DecodeBatch) -> list[bool]:
        """Never: a diffusion row's output ends in blocks that are not AR's, so it stays diffusion
        (an `auto_lossy` row moves in at another decoding's boundary, never out)."""
        return [False] * batch.size

    def pending_commit(self, batch: DecodeBatch) -> list[bool]:
        return list(batch.state(DiffusionRows).committing)  # a finished block, emitted, to be committed

    def start(self, batch: DecodeBatch) -> None:
        b, n, device = self.block_length, batch.size, batch.seeds.device
        batch.decoding = DiffusionRows(
            block=torch.full((n, b), batch.mask_id, dtype=torch.long, device=device),
            masked=torch.zeros(n, b, dtype=torch.bool, device=device),
            in_budget=torch.zeros(n, b, dtype=torch.bool, device=device),
            fresh=torch.zeros(n, dtype=torch.bool, device=device),
            passes=torch.zeros(n, dtype=torch.long, device=device),
            logprobs=None,
            committing=[b == 1] * n,  # a block of length 1 has nothing to reveal: it commits every step
        )
        self._new_block(batch, torch.ones(batch.size, dtype=torch.bool, device=device))

    def _new_block(self, batch: DecodeBatch, rows: torch.Tensor) -> None:
        """[seed, MASK x (b-1)] for `rows` (bool (B,)); their budgets are read at the next plan,
        once the engine has counted the seed they just emitted."""
        s = batch.state(DiffusionRows)
        fresh_block = torch.full_like(s.block, batch.mask_id)
        fresh_block[:, 0] = batch.seeds
        unmasked = torch.ones_like(s.masked)
        unmasked[:, 0] = False
        s.block = torch.where(rows[:, None], fresh_block, s.block)
        s.masked = torch.where(rows[:, None], unmasked, s.masked)
        s.passes = torch.where(rows, 0, s.passes)
        s.fresh = s.fresh | rows

    def plan(self, batch: DecodeBatch) -> Forward:
        s, device = batch.state(DiffusionRows), batch.seeds.device
        # Blocks always have the configured length (as in the reference), so a row decodes the same
        # alone or batched; a row whose budget ends inside the block stops once its budget is revealed.
        positions = torch.arange(self.block_length, device=device)
        budget = positions < (batch.remaining[:, None] + 1)  # (B, b); the seed is position 0
        s.in_budget = torch.where(s.fresh[:, None], budget, s.in_budget)
        s.fresh = torch.zeros_like(s.fresh)
        kind, causal = mixed(s.committing, ("denoise", "commit"), device)
        return Forward(kind, s.block, causal=causal)

    def accept(self, batch: DecodeBatch, logits: torch.Tensor) -> Emission:
        s, b, device = batch.state(DiffusionRows), self.block_length, batch.seeds.device
        was_committing = s.committing
        committing = torch.tensor(was_committing, device=device)
        denoising = ~committing
        sampler = batch.sampler
        greedy = sampler.all_greedy
        # Committing rows: their block's KV joins the prefix; the last position gives the next seed.
        keep = keep_counts([b if c else 0 for c in was_committing])
        commit_rows = None if greedy else rows_where(was_committing)
        raw, logits = logits, self._controlled(batch, logits, committing)
        next_seed = sampler.pick(logits[:, -1:], rows=commit_rows)[:, 0]
        seed_logprobs = batch.logprobs_of(raw[:, -1:], next_seed[:, None])  # before the mask edit
        # Denoising rows: one pass. Only they draw random numbers, so a seeded row samples the same
        # alone or beside rows at other stages.
        normalizer = logits.float().logsumexp(-1)  # (B, b): the full softmax's, [MASK] included
        raw_normalizer = normalizer if raw is logits else raw.float().logsumexp(-1)
        logits = batch.bidirectional_logits(logits)
        candidates = sampler.pick(logits, rows=None if greedy else rows_where([not c for c in was_committing]))
        # The candidate's untempered probability, whether picked greedily or sampled (as LLaDA
        # and Fast-dLLM do), so the reveal schedule does not depend on temperature or top-k/top-p.
        confidence = (logits.gather(-1, candidates[..., None])[..., 0].float() - normalizer).exp()
        open_slots = s.masked & denoising[:, None]
        confidence = confidence.masked_fill(~open_slots, -1.0)
        if self.threshold is None:
            reveal = torch.zeros_like(open_slots)
        else:
            reveal = (confidence >= self.threshold) & open_slots
        reveal.scatter_(1, confidence.argmax(1, keepdim=True), True)  # the most confident, always
        reveal &= open_slots
        if seed_logprobs is not None:
            # A revealed token's log-probability is the one its reveal pass gave it (the full
            # softmax's, as its confidence), kept with the block until the block is emitted.
            raw = batch.bidirectional_logits(raw)  # a no-op when it is `logits`, edited above
            table = logprob_table(raw.float() - raw_normalizer[..., None], candidates, MAX_LOGPROBS)
            kept = s.logprobs if s.logprobs is not None else table.new_zeros(table.shape)
            s.logprobs = torch.where(reveal[..., None], table, kept)
        s.block = torch.where(reveal, candidates, s.block)
        s.masked = s.masked & ~reveal
        s.passes = s.passes + denoising.long()
        is_eos = torch.isin(s.block, batch.eos_ids) & ~s.masked & batch.stop_on_eos[:, None]
        is_eos[:, 0] = False
        first_eos = torch.where(is_eos.any(1), is_eos.long().argmax(1), b)
        left_of_eos = torch.arange(b, device=device)[None] < first_eos[:, None]
        eos_done = is_eos.any(1) & ~(s.masked & left_of_eos).any(1)
        finished = denoising & (~(s.masked & s.in_budget).any(1) | eos_done)
        # A finished block is emitted now and committed by the next step, unless the row ends with it.
        commits_next = finished & ~eos_done & (batch.remaining > b - 1)
        batch.seeds = torch.where(committing, next_seed, batch.seeds)
        self._new_block(batch, committing)
        # For the step's transfer, per row: finished?, commits next?, passes, seed, block.
        flags = torch.stack([finished.long(), commits_next.long(), s.passes, next_seed], 1)

        def read(rows: list[list[int]]) -> list[list[int]]:
            batch.record([r[2] for r in rows], rows=[bool(r[0]) for r in rows])
            s.committing = [bool(r[1]) or (c and b == 1) for r, c in zip(rows, was_committing)]
            return [r[5:] if r[0] else [r[3]] if c else [] for r, c in zip(rows, was_committing)]

        logprobs = self._emitted_logprobs(batch, committing, seed_logprobs)
        return Emission(torch.cat([flags, s.block], 1), read, logprobs, keep=keep)

    def _controlled(self, batch: DecodeBatch, logits: torch.Tensor, committing: torch.Tensor) -> torch.Tensor:
        """The pass's logits under the rows' logit controls. A denoising row's position p predicts
        its block's token p, output token `generated + p - 1`, after the block's tokens revealed so
        far; a committing row's last position predicts its next seed, its whole block counted."""
        if batch.controls is None:
            return logits
        s, b = batch.state(DiffusionRows), self.block_length
        positions = torch.arange(b, device=logits.device)
        offsets = torch.where(committing[:, None], positions - (b - 1), positions - 1)
        revealed = (~s.masked & ~committing[:, None]).float()
        revealed[:, 0] = 0  # the seed: emitted, so counted already
        within = torch.zeros(logits.shape[0], logits.shape[-1], device=logits.device)
        within.scatter_add_(1, s.block, revealed)
        return batch.controlled(logits, offsets, within[:, None])

    def _emitted_logprobs(
        self, batch: DecodeBatch, committing: torch.Tensor, seed: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Per row, the entries of what it emits: a committing row its next seed's, a finished
        block its revealed positions' (1 .. b-1)."""
        if seed is None:
            return None
        if self.block_length == 1:
            return seed
        kept = batch.state(DiffusionRows).logprobs
        assert kept is not None  # written by the accept that asked for logprobs
        blocks = kept[:, 1:]
        seeds = torch.cat([seed, blocks[:, 1:]], 1)
        return torch.where(committing[:, None, None], seeds, blocks)
