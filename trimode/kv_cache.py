"""The one owner of KV memory and of position arithmetic.

Layout: one preallocated tensor per K and V, (layers, B, H_kv, capacity, D). Row b holds its clean,
causally computed prefix in slots [0, lengths[b]). Every forward writes its new K/V into the slots
right after the prefix, [lengths[b], lengths[b] + T); whether those writes become part of the prefix
is decided afterwards by `commit` (advance by T, or by a per-row count after verification). A pass
that must not write the cache (diffusion denoise, self-spec draft) simply never commits: its slots
are scratch, invisible behind `lengths`, and overwritten by the next pass. So "read-only attach",
"write" and "write then crop" are one mechanism, and rows of different lengths share one batch.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_layers, batch_size, num_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.capacity = capacity
        self._pending: int | None = None  # T of the last forward, until it is committed or discarded

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def begin(self, num_tokens: int) -> tuple[torch.Tensor, int]:
        """Prepare a forward of `num_tokens` new tokens per row.

        Returns (positions (B, T), number of key slots S the pass attends over)."""
        span = int(self.lengths.max()) + num_tokens
        if span > self.capacity:
            raise RuntimeError(f"KV cache overflow: need {span} slots, capacity {self.capacity}")
        self._pending = num_tokens
        positions = self.lengths[:, None] + torch.arange(num_tokens, device=self.lengths.device)
        return positions, span

    def attention_mask(self, num_tokens: int, span: int, causal: torch.Tensor | bool) -> torch.Tensor:
        """(B, 1, T, S) bool, True = attend. Key j is visible to query i of row b iff
        j < lengths[b] + (i + 1 if causal else T): the whole clean prefix, plus the new tokens either
        causally or bidirectionally (`causal`: one value, or one per row (B,)). Scratch slots past
        that are never visible."""
        device = self.lengths.device
        keys = torch.arange(span, device=device)
        steps = torch.arange(1, num_tokens + 1, device=device)
        if isinstance(causal, torch.Tensor):
            limit = self.lengths[:, None] + torch.where(causal.to(device)[:, None], steps, num_tokens)
        else:
            limit = self.lengths[:, None] + (steps if causal else num_tokens)
        return (keys[None, None, :] < limit[:, :, None])[:, None]

    def write(
        self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, span: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, D) at `positions` (B, T); return this layer's keys/values (B, H, S, D)."""
        index = positions[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        self.k[layer].scatter_(2, index, k)
        self.v[layer].scatter_(2, index, v)
        return self.k[layer, :, :, :span], self.v[layer, :, :, :span]

    def commit(self, counts: torch.Tensor | None = None) -> None:
        """Make the last pass's first `counts[b]` tokens (all T when None) part of row b's prefix."""
        if self._pending is None:
            raise RuntimeError("commit() without a pending forward")
        self.lengths += self._pending if counts is None else counts.to(self.lengths)
        self._pending = None

    def set_lengths(self, lengths: torch.Tensor) -> None:
        """Crop (or, after a padded prefill, set) each row's prefix length."""
        if bool((lengths > self.capacity).any()) or bool((lengths < 0).any()):
            raise ValueError(f"lengths must lie in [0, {self.capacity}]")
        self.lengths = lengths.to(self.lengths).clone()
        self._pending = None

    def extend(self, other: KVCache) -> None:
        """Append `other`'s rows (e.g. newly prefilled requests joining a running batch)."""
        if self._pending is not None or other._pending is not None:
            raise RuntimeError("extend() between a forward and its commit")
        capacity = max(self.capacity, other.capacity)

        def grow(t: torch.Tensor) -> torch.Tensor:
            pad = capacity - t.shape[3]
            return torch.nn.functional.pad(t, (0, 0, 0, pad)) if pad else t

        self.k = torch.cat([grow(self.k), grow(other.k)], 1)
        self.v = torch.cat([grow(self.v), grow(other.v)], 1)
        self.lengths = torch.cat([self.lengths, other.lengths])
        self.capacity = capacity

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (indices into the batch), e.g. when finished requests leave."""
        self.k = self.k[:, rows]
        self.v = self.v[:, rows]
        self.lengths = self.lengths[rows]
