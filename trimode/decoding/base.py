"""The Decoder interface every mode implements, and the batch state decoders step on.

A decoder's `step` runs one unit of its mode (AR: one token; diffusion: one block; self-spec: one
draft + verify cycle) for every row of the batch and returns the tokens each row emitted. Rows are
independent: each has its own cache length, seed token, sampling parameters and budget.
"""

from __future__ import annotations

import copy
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from trimode.engine.model_runner import ModelRunner
from trimode.kv_cache import KVCache
from trimode.sampler import Sampler


@dataclass
class DecodeBatch:
    runner: ModelRunner
    kv: KVCache
    sampler: Sampler
    seeds: torch.Tensor  # (B,) the last emitted token of each row, not yet fed to the model
    remaining: torch.Tensor  # (B,) host: tokens each row may still emit
    eos_ids: torch.Tensor  # (E,) ids that end a row
    stop_on_eos: torch.Tensor  # (B,) bool, False for rows with ignore_eos
    mask_id: int
    num_forwards: torch.Tensor  # (B,) host: forwards each row took part in, prefill included
    stats: list[list[int]] = field(default_factory=list)  # per row: the mode's per-step statistic
    # kind -> [count, seconds]; on CUDA each timed forward synchronises the device.
    timings: dict[str, list[float]] = field(default_factory=lambda: defaultdict(lambda: [0, 0.0]))

    @property
    def size(self) -> int:
        return self.seeds.shape[0]

    def forward(
        self,
        kind: str,
        tokens: torch.Tensor,
        causal: bool,
        rows: torch.Tensor | None = None,
        use_draft_lora: bool = False,
        logit_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One timed forward; counts it for `rows` (bool (B,), all rows when None)."""
        start = time.perf_counter()
        logits = self.runner.forward(self.kv, tokens, causal, use_draft_lora, logit_index)
        if logits.is_cuda:
            torch.cuda.synchronize()
        entry = self.timings[kind]
        entry[0] += 1
        entry[1] += time.perf_counter() - start
        self.num_forwards += 1 if rows is None else rows.cpu().long()
        return logits

    def bidirectional_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """A masked position predicts its own token, which is never the mask token itself."""
        logits[..., self.mask_id] = float("-inf")
        return logits

    def record(self, values: torch.Tensor) -> None:
        for row, v in zip(self.stats, values.tolist()):
            row.append(int(v))

    def extend(self, other: DecodeBatch) -> None:
        """Append `other`'s rows: requests prefilled later join this running batch (continuous
        batching). Decoders treat rows independently, so a row decodes the same either way."""
        self.kv.extend(other.kv)
        self.sampler.extend(other.sampler)
        self.seeds = torch.cat([self.seeds, other.seeds])
        self.remaining = torch.cat([self.remaining, other.remaining])
        self.num_forwards = torch.cat([self.num_forwards, other.num_forwards])
        self.stop_on_eos = torch.cat([self.stop_on_eos, other.stop_on_eos])
        self.stats += other.stats
        for kind, (n, s) in other.timings.items():
            self.timings[kind][0] += n
            self.timings[kind][1] += s

    def split(self, parts: list[list[int]]) -> list[DecodeBatch]:
        """One new batch per list of row indices: rows prefilled together, decoded apart. Each part
        owns its rows' KV (indexing copies) and a copy of the timings so far."""
        if len(parts) == 1 and parts[0] == list(range(self.size)):
            return [self]
        batches = []
        for rows in parts:
            part = copy.copy(self)
            part.kv, part.sampler = copy.copy(self.kv), copy.copy(self.sampler)
            part.timings = defaultdict(lambda: [0, 0.0], {k: list(v) for k, v in self.timings.items()})
            part.select_rows(torch.tensor(rows))
            batches.append(part)
        return batches

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (host indices), e.g. after requests finish."""
        self.kv.select_rows(rows.to(self.kv.lengths.device))
        self.sampler.select_rows(rows)
        self.seeds = self.seeds[rows.to(self.seeds.device)]
        self.remaining, self.num_forwards = self.remaining[rows], self.num_forwards[rows]
        self.stop_on_eos = self.stop_on_eos[rows.to(self.stop_on_eos.device)]
        self.stats = [self.stats[i] for i in rows.tolist()]


class Decoder(ABC):
    mode: ClassVar[str]
    stat_name: ClassVar[str | None] = None  # what `DecodeBatch.stats` holds for this mode

    @abstractmethod
    def step(self, batch: DecodeBatch) -> list[list[int]]:
        """Advance every row; return the tokens each row emitted (the driver truncates at EOS/budget)."""
