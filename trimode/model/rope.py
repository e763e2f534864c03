"""Rotary position embedding with YaRN frequency blending and Llama-4 query scaling.

YaRN: Peng et al. 2023 ("YaRN: Efficient Context Window Extension"), in the form Hugging Face
transformers uses for Ministral-3, which is the numerical reference for our causal forward.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trimode.config import RopeConfig


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq of shape (head_dim/2,), attention factor applied to cos/sin). Computed on the
    CPU whatever the default device (a model built on the meta device too): the same numbers
    everywhere, and no meta kernels, whose first use imports torch._dynamo."""
    base, dim = rope.rope_theta, head_dim
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    if rope.rope_type == "default":
        return 1.0 / pos_freqs, 1.0
    factor = rope.factor
    attention_factor = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)

    def correction_dim(num_rotations: float) -> float:
        # The dimension whose wavelength fits `num_rotations` times into the original context.
        return (
            dim * math.log(rope.original_max_position_embeddings / (num_rotations * 2 * math.pi)) / (2 * math.log(base))
        )

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high: float = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1: keep the original frequency (high-frequency dims), 0: interpolate
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for positions and the per-position Llama-4 query scale."""

    inv_freq: torch.Tensor  # (head_dim/2,) fp32, a buffer

    def __init__(self, rope: RopeConfig, head_dim: int) -> None:
        super().__init__()
        inv_freq, self.attention_factor = inverse_frequencies(rope, head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.beta = rope.llama_4_scaling_beta
        self.original_max = rope.original_max_position_embeddings

    @torch.no_grad()
    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """positions (B, T) -> cos, sin (B, 1, T, D) and query scale (B, 1, T, 1), all in `dtype`."""
        freqs = positions[..., None].float() * self.inv_freq.float()  # (B, T, D/2), fp32 for large positions
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_factor).to(dtype)[:, None]
        sin = (emb.sin() * self.attention_factor).to(dtype)[:, None]
        # Llama-4 attention temperature: exactly 1 below original_max_position_embeddings.
        q_scale = 1 + self.beta * torch.log1p(torch.floor(positions.float() / self.original_max))
        return cos, sin, q_scale.to(dtype)[:, None, :, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D): rotate the two halves of the head dimension (the Llama/Mistral convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
