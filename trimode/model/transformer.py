"""The Ministral-3 decoder with the untied `diffusion_head` (design doc section 3).

Module names mirror the checkpoint's tensor names (`encoder.layers.0.self_attn.q_proj.weight`, ...),
so loading is a name-for-name copy. The attention pattern and whether the KV cache is written are
properties of each forward (`ForwardContext`), never of the module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import CausalBias

from trimode.config import ModelConfig
from trimode.kv_cache import KVCache
from trimode.model.rope import RotaryEmbedding, apply_rotary


@dataclass
class ForwardContext:
    """Everything a forward needs besides the tokens.

    With `kv` set, new K/V are written to the cache's scratch slots and the keys are the rows'
    cached prefixes plus them (S slots, `KVCache.begin`); without it (training, slow references)
    the keys are the tokens themselves and `mask` is given explicitly, shape (B, 1, T, T)."""

    positions: torch.Tensor  # (B, T) absolute positions
    mask: torch.Tensor | CausalBias | None  # (B, 1, T, S) bool, True = attend; or a pattern SDPA knows
    kv: KVCache | None = None
    use_draft_lora: torch.Tensor | bool = False  # (B,) per row, (B, T) per position, or one value


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 then cast back before the weight, as the HF reference does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class LoRA(nn.Module):
    """A low-rank delta `scale * B(A(x))` (PEFT layout: A is (r, in), B is (out, r))."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float) -> None:
        super().__init__()
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(x)) * self.scale


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.draft_lora: LoRA | None = None  # applied to o_proj in self-spec draft passes only

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor], ctx: ForwardContext
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin, q_scale = rope
        q = apply_rotary(q, cos, sin) * q_scale
        k = apply_rotary(k, cos, sin)
        if ctx.kv is not None:
            k, v = ctx.kv.write(self.layer_index, k, v)
        # GQA: each KV head serves num_heads / num_kv_heads query heads; scale 1/sqrt(head_dim).
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=ctx.mask, enable_gqa=self.num_heads != self.num_kv_heads
        )
        out = out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        y = self.o_proj(out)
        lora = ctx.use_draft_lora
        if self.draft_lora is not None and isinstance(lora, torch.Tensor):  # per row (B,) or per position (B, T)
            y = y + self.draft_lora(out) * (lora[:, None, None] if lora.dim() == 1 else lora[..., None]).to(y.dtype)
        elif self.draft_lora is not None and lora:
            y = y + self.draft_lora(out)
        return y


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor], ctx: ForwardContext
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), rope, ctx)
        return h + self.mlp(self.post_attention_layernorm(h))


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    """`encoder` + untied `diffusion_head`, which gives the logits of every mode."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.diffusion_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.rope, cfg.head_dim)

    def forward(
        self, input_ids: torch.Tensor, ctx: ForwardContext, logit_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V) in fp32, or (B, 1, V) at `logit_index` (B,) per row."""
        h = self.encoder.embed_tokens(input_ids)
        rope = self.rotary(ctx.positions, h.dtype)
        for layer in self.encoder.layers:
            h = layer(h, rope, ctx)
        if logit_index is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logit_index][:, None]
        return self.diffusion_head(self.encoder.norm(h)).float()

    def attach_draft_lora(self, rank: int, scale: float) -> None:
        """Create (zero-initialised B) draft LoRA modules on every o_proj; the loader fills them."""
        for layer in self.encoder.layers:
            attn = layer.self_attn
            attn.draft_lora = LoRA(attn.o_proj.in_features, attn.o_proj.out_features, rank, scale).to(
                device=attn.o_proj.weight.device, dtype=attn.o_proj.weight.dtype
            )

    @property
    def has_draft_lora(self) -> bool:
        return self.encoder.layers[0].self_attn.draft_lora is not None
