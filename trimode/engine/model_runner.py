"""ModelRunner: runs one forward of the model over a KV cache with a given attention pattern."""

from __future__ import annotations

import torch

from trimode.kv_cache import KVCache
from trimode.model.transformer import ForwardContext, Transformer


class ModelRunner:
    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.config = model.config
        self.device = model.diffusion_head.weight.device
        self.dtype = model.diffusion_head.weight.dtype

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        cfg = self.config
        return KVCache(
            cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, cfg.head_dim, capacity, self.dtype, self.device
        )

    @torch.inference_mode()
    def forward(
        self,
        kv: KVCache,
        tokens: torch.Tensor,
        causal: bool,
        use_draft_lora: bool = False,
        logit_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (B, T) after each row's cached prefix -> fp32 logits (B, T, V) (or (B, 1, V) at logit_index).

        The pass writes its K/V into the cache's scratch slots; the caller decides with
        `kv.commit(...)` whether they become part of the prefix."""
        positions, span = kv.begin(tokens.shape[1])
        ctx = ForwardContext(
            positions=positions,
            mask=kv.attention_mask(tokens.shape[1], span, causal),
            kv=kv,
            span=span,
            use_draft_lora=use_draft_lora,
        )
        return self.model(tokens, ctx, logit_index=logit_index)
