"""The Ministral-3 decoder with the untied `diffusion_head` (design doc section 3).

Module names mirror the checkpoint's tensor names (`encoder.layers.0.self_attn.q_proj.weight`, ...),
so loading is a name-for-name copy. The attention pattern and whether the KV cache is written are
properties of each forward (`ForwardContext`), never of the module.

One forward may run several batches at once (`Transformer.forward_parts`): the engine puts the
decode rows of one mode beside another mode's block pass or a prefill. Every layer but attention
works per token, so it runs once over all parts' tokens concatenated (N, hidden); attention runs per
part, over that part's own cache and pattern. On a CPU a small forward costs mostly its per-op
overhead, so a part added to another forward costs its tokens' share of the matrix products only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from trimode.config import ModelConfig
from trimode.kv_cache import KVPool, KVView, Mask
from trimode.model.rope import RotaryEmbedding, apply_rotary
from trimode.model.tensor_parallel import TensorParallel


@dataclass
class ForwardContext:
    """Everything a forward needs besides the tokens.

    With `kv` set, new K/V are written to the cache's scratch slots and the keys are the rows'
    cached prefixes plus them (S slots, `KVCache.begin`'s view); without it (training, slow references)
    the keys are the tokens themselves and `mask` is given explicitly, shape (B, 1, T, T)."""

    positions: torch.Tensor  # (B, T) absolute positions
    mask: Mask  # (B, 1, T, S) bool, True = attend; None: every key; CAUSAL: causal over itself
    kv: KVView | None = None
    use_draft_lora: torch.Tensor | bool = False  # (B,) per row, (B, T) per position, or one value


@dataclass
class Part:
    """One batch of a forward: its tokens, context and (optionally) the one position per row whose
    logits are wanted."""

    input_ids: torch.Tensor  # (B, T)
    ctx: ForwardContext
    logit_index: torch.Tensor | None = None  # (B,), or (B, K): several positions per row


@dataclass
class _Packed:
    """The parts of one forward laid end to end: part i's tokens are rows [start, start + B*T) of the
    flat (N, hidden) activations, in (B, T) order."""

    spans: list[tuple[int, int, int]]  # (start, B, T) per part
    ctxs: list[ForwardContext]
    rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # cos, sin (N, 1, D); query scale (N, 1, 1)
    lora: torch.Tensor | bool  # draft LoRA on every token (bool) or per token (N, 1)
    reduce: Callable[[torch.Tensor], torch.Tensor]  # sums a row-parallel layer's partial outputs over ranks


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _lora_per_token(parts: list[Part]) -> torch.Tensor | bool:
    """The parts' draft-LoRA flags as one bool when all tokens agree (the model then skips per-token
    work), else as a (N, 1) per-token factor."""
    flags = [p.ctx.use_draft_lora for p in parts]
    if all(isinstance(f, bool) for f in flags) and len(set(flags)) == 1:
        return flags[0]
    per_token = []
    for f, p in zip(flags, parts):
        f = torch.as_tensor(f, device=p.input_ids.device)
        f = f.view(1, 1) if f.dim() == 0 else f[:, None] if f.dim() == 1 else f  # one, per row, per position
        per_token.append(f.expand(p.input_ids.shape).reshape(-1))
    return torch.cat(per_token)[:, None]


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
        self.layer_index, self.head_dim = layer_index, cfg.head_dim
        q_width, kv_width = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_width, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_width, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_width, bias=False)
        self.o_proj = nn.Linear(q_width, cfg.hidden_size, bias=False)
        self.draft_lora: LoRA | None = None  # applied to o_proj in self-spec draft passes only

    def forward(self, x: torch.Tensor, packed: _Packed) -> torch.Tensor:
        """x (N, hidden), every part's tokens -> (N, hidden). Head counts come from the projections'
        outputs: under tensor parallelism they are this rank's share of the heads, and the output a
        partial sum the caller reduces."""
        n, d = x.shape[0], self.head_dim
        cos, sin, q_scale = packed.rope
        q = apply_rotary(self.q_proj(x).view(n, -1, d), cos, sin) * q_scale
        k = apply_rotary(self.k_proj(x).view(n, -1, d), cos, sin)
        v = self.v_proj(x).view(n, -1, d)
        outs = [self._attend(q, k, v, span, ctx) for span, ctx in zip(packed.spans, packed.ctxs)]
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        y = self.o_proj(out)
        if self.draft_lora is not None and isinstance(packed.lora, torch.Tensor):
            y = y + self.draft_lora(out) * packed.lora.to(y.dtype)
        elif self.draft_lora is not None and packed.lora:
            y = y + self.draft_lora(out)
        return y

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, span: tuple[int, int, int], ctx: ForwardContext
    ) -> torch.Tensor:
        """One part's attention: its rows [start, start + B*T) of q, k, v (rows, heads, D) -> (B*T, H*D)."""
        start, b, t = span
        q, k, v = (x[start : start + b * t].view(b, t, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))  # (B, H, T, D)
        if ctx.kv is not None:
            k, v = ctx.kv.write(self.layer_index, k, v)
        # GQA: each KV head serves num_heads / num_kv_heads query heads; scale 1/sqrt(head_dim).
        causal = isinstance(ctx.mask, str)  # CAUSAL
        mask = None if isinstance(ctx.mask, str) else ctx.mask
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1]
        )
        return out.transpose(1, 2).reshape(b * t, -1)


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

    def forward(self, h: torch.Tensor, packed: _Packed) -> torch.Tensor:
        # Under inference tensor parallelism o_proj and down_proj give partial sums: one all-reduce each.
        h = h + packed.reduce(self.self_attn(self.input_layernorm(h), packed))
        return h + packed.reduce(self.mlp(self.post_attention_layernorm(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    @property
    def decoder_layers(self) -> list[DecoderLayer]:
        """`layers`, typed (a ModuleList's items are plain Modules to a type checker)."""
        return [cast(DecoderLayer, layer) for layer in self.layers]


class _SkipInit(TorchFunctionMode):
    """Skips `torch.nn.init`'s initialisers (they return their tensor untouched)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """Build modules on the meta device (shapes, no memory) without running their initialisers:
    on meta tensors they mean nothing, and torch runs them through Python references whose first
    use imports torch._dynamo, about a second of every process that loads a model."""
    with torch.device("meta"), _SkipInit():
        yield


class Transformer(nn.Module):
    """`encoder` + untied `diffusion_head`, which gives the logits of every mode."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.diffusion_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.rope, cfg.head_dim)
        # Inference tensor parallelism (`shard_model`): this rank's weight slices and their group.
        self.tp: TensorParallel | None = None
        self.activation_checkpointing = False  # training: recompute each layer in the backward pass

    def forward(
        self, input_ids: torch.Tensor, ctx: ForwardContext, logit_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V) in fp32, or (B, K, V) at `logit_index` (B, K) per row
        ((B, 1, V) at a (B,) index)."""
        return self.forward_parts([Part(input_ids, ctx, logit_index)])[0]

    def forward_parts(self, parts: list[Part], head: bool = True) -> list[torch.Tensor]:
        """Several batches in one forward: each part's logits, as `forward` would give them alone.
        Without `head`, the final-normed hidden states (B, T', hidden) they come from (`logits`)."""
        spans, start = [], 0
        for p in parts:
            b, t = p.input_ids.shape
            spans.append((start, b, t))
            start += b * t
        ids = torch.cat([p.input_ids.reshape(-1) for p in parts]) if len(parts) > 1 else parts[0].input_ids.reshape(-1)
        positions = torch.cat([p.ctx.positions.expand(p.input_ids.shape).reshape(-1) for p in parts])
        h = self.tp.embed(self.encoder.embed_tokens, ids) if self.tp else self.encoder.embed_tokens(ids)  # (N, hidden)
        cos, sin, q_scale = self.rotary(positions[None], h.dtype)  # (1, 1, N, D), (1, 1, N, 1)
        rope = cos[0, 0, :, None], sin[0, 0, :, None], q_scale[0, 0, :, None]
        reduce = self.tp.all_reduce if self.tp else _identity
        packed = _Packed(spans, [p.ctx for p in parts], rope, _lora_per_token(parts), reduce)
        for layer in self.encoder.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                h = checkpoint(layer, h, packed, use_reentrant=False)
            else:
                h = layer(h, packed)
        wanted = []  # per part: its rows of h whose logits are wanted, (B*T', hidden)
        for p, (s, b, t) in zip(parts, spans):
            rows = h[s : s + b * t]
            if p.logit_index is not None:
                index = p.logit_index if p.logit_index.dim() == 2 else p.logit_index[:, None]
                rows = rows.view(b, t, -1)[torch.arange(b, device=h.device)[:, None], index].flatten(0, 1)
            wanted.append(rows)
        h = self.encoder.norm(torch.cat(wanted) if len(wanted) > 1 else wanted[0])
        flat = self.logits(h) if head else h
        out, at = [], 0
        for p, (_, b, t) in zip(parts, spans):
            if p.logit_index is not None:
                t = p.logit_index.shape[1] if p.logit_index.dim() == 2 else 1
            out.append(flat[at : at + b * t].view(b, t, -1))
            at += b * t
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states (..., hidden) -> fp32 logits (..., V)."""
        logits = self.diffusion_head(hidden).float()
        return self.tp.gather_vocab(logits) if self.tp else logits

    def attach_draft_lora(self, rank: int, scale: float) -> None:
        """Create (zero-initialised B) draft LoRA modules on every o_proj; the loader fills them."""
        for layer in self.encoder.decoder_layers:
            attn = layer.self_attn
            attn.draft_lora = LoRA(attn.o_proj.in_features, attn.o_proj.out_features, rank, scale).to(
                device=attn.o_proj.weight.device, dtype=attn.o_proj.weight.dtype
            )

    @property
    def weight_bytes(self) -> int:
        """Bytes of every weight (the parameters; the model has no persistent buffers)."""
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def assign_weights(self, tensors: dict[str, torch.Tensor], device: torch.device | str) -> None:
        """Take `tensors` (every weight, on `device`) as this model's own, as a model built on the
        meta device needs, and build its RoPE tables there (buffers no checkpoint holds)."""
        self.load_state_dict(tensors, strict=True, assign=True)
        self.rotary = RotaryEmbedding(self.config.rope, self.config.head_dim).to(device)

    def new_kv_pool(self, num_pages: int, page_size: int) -> KVPool:
        """A KV pool shaped for this model: its layers, this rank's KV heads, its dtype and device."""
        weight = self.diffusion_head.weight
        cfg = self.config
        return KVPool(
            cfg.num_hidden_layers,
            num_pages,
            page_size,
            self.num_local_kv_heads,
            cfg.head_dim,
            weight.dtype,
            weight.device,
        )

    @property
    def num_local_kv_heads(self) -> int:
        """KV heads this rank's cache holds (all of them without tensor parallelism)."""
        attn = self.encoder.decoder_layers[0].self_attn
        return attn.k_proj.weight.shape[0] // attn.head_dim

    @property
    def has_draft_lora(self) -> bool:
        return self.encoder.decoder_layers[0].self_attn.draft_lora is not None
