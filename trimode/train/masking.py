"""Noise for the diffusion half of the joint objective, and the Set Block Decoding attention mask.

Both maskers work per block of `block_size` positions: each block draws its own t ~ U(0, 1), so
every batch mixes nearly-clean and nearly-masked blocks, as block decoding sees at inference.
Only loss-eligible positions (e.g. assistant tokens of a chat) are ever masked.
"""

from __future__ import annotations

import math

import torch


def _blocks(x: torch.Tensor, block_size: int, fill: float | bool) -> torch.Tensor:
    """(N, L) -> (N, nblocks, block_size), padding the last block with `fill`."""
    n, length = x.shape
    pad = (-length) % block_size
    if pad:
        x = torch.cat([x, torch.full((n, pad), fill, dtype=x.dtype, device=x.device)], 1)
    return x.view(n, -1, block_size)


def _unblock(x: torch.Tensor, length: int) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)[:, :length]


def uniform_masking(
    eligible: torch.Tensor, block_size: int, gen: torch.Generator, eps: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaDA-style: p_mask = (1 - eps) t + eps per block; each eligible token masked independently.

    eligible (N, L) bool -> (is_masked (N, L) bool, p_mask (N, L) float)."""
    n, length = eligible.shape
    nblocks = math.ceil(length / block_size)
    t = torch.rand(n, nblocks, 1, generator=gen, device=gen.device)
    p = ((1 - eps) * t + eps).expand(-1, -1, block_size)
    u = torch.rand(n, nblocks, block_size, generator=gen, device=gen.device)
    is_masked = (u < p) & _blocks(eligible, block_size, False)
    return _unblock(is_masked, length), _unblock(p, length)


def position_dependent_masking(
    eligible: torch.Tensor, block_size: int, gen: torch.Generator, half_life_ratio: float = 0.1, eps: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Efficient-DLM: exactly round(t * L') masks per block (L' = its eligible positions), chosen by
    Gumbel top-k with weights w_i = exp(beta (1 - t) i), i the position in the block and
    beta = ln 2 / (lambda L'). Small t (few masks) puts them at the end of the block, as left-to-right
    decoding leaves them; t -> 1 is uniform. The loss weight uses p_mask = (1 - eps) t + eps."""
    n, length = eligible.shape
    el = _blocks(eligible, block_size, False)
    nblocks = el.shape[1]
    t = torch.rand(n, nblocks, 1, generator=gen, device=gen.device)
    count = el.sum(-1, keepdim=True)  # L' per block
    k = torch.round(t * count)
    beta = math.log(2) / (half_life_ratio * count.clamp(min=1))
    i = torch.arange(block_size, device=el.device)
    u = torch.rand(n, nblocks, block_size, generator=gen, device=gen.device).clamp(1e-20, 1 - 1e-7)
    scores = beta * (1 - t) * i - torch.log(-torch.log(u))  # log w_i + Gumbel noise
    scores = scores.masked_fill(~el, float("-inf"))
    rank = scores.argsort(-1, descending=True).argsort(-1)
    is_masked = (rank < k) & el
    p = ((1 - eps) * t + eps).expand(-1, -1, block_size)
    return _unblock(is_masked, length), _unblock(p, length)


def sbd_attention_mask(length: int, block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(2L, 2L) bool for the doubled sequence [x_t | x_0], True = attend (Set Block Decoding):
    noisy -> noisy inside its own block (bidirectional); noisy -> clean of strictly earlier blocks;
    clean -> clean causal; clean -> noisy never."""
    pos = torch.arange(length, device=device)
    block = pos // block_size
    noisy_noisy = block[:, None] == block[None, :]
    noisy_clean = block[None, :] < block[:, None]
    clean_clean = pos[None, :] <= pos[:, None]
    top = torch.cat([noisy_noisy, noisy_clean], 1)
    bottom = torch.cat([torch.zeros_like(clean_clean), clean_clean], 1)
    return torch.cat([top, bottom], 0)
