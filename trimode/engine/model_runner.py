"""ModelRunner: the only caller of the model. Runs one forward over a KV cache with a given
attention pattern, and, for a decoder's planned forward, counts and times it."""

from __future__ import annotations

import time

import torch

from trimode.decoding.base import DecodeBatch, Forward
from trimode.kv_cache import PAGE_SIZE, KVCache, KVPool, num_pages
from trimode.model.transformer import ForwardContext, Transformer


class ModelRunner:
    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.config = model.config
        self.device = model.diffusion_head.weight.device
        self.dtype = model.diffusion_head.weight.dtype

    def new_pool(self, num_tokens: int, page_size: int) -> KVPool:
        """The KV pool for `num_tokens` slots (rounded up to whole pages of `page_size`)."""
        cfg = self.config
        return KVPool(
            cfg.num_hidden_layers,
            num_pages(num_tokens, page_size),
            page_size,
            cfg.num_key_value_heads,
            cfg.head_dim,
            self.dtype,
            self.device,
        )

    def new_cache(self, batch_size: int, capacity: int, page_size: int = PAGE_SIZE) -> KVCache:
        """`batch_size` empty rows of up to `capacity` slots each, over a pool of their own."""
        return KVCache(self.new_pool(batch_size * num_pages(capacity, page_size) * page_size, page_size), batch_size)

    @torch.inference_mode()
    def forward(
        self,
        kv: KVCache,
        tokens: torch.Tensor,
        causal: torch.Tensor | bool,
        use_draft_lora: torch.Tensor | bool = False,
        logit_index: torch.Tensor | None = None,
        num_fed: list[int] | None = None,
    ) -> torch.Tensor:
        """tokens (B, T) after each row's cached prefix -> fp32 logits (B, T, V) (or (B, 1, V) at logit_index).

        The pass writes its K/V into the cache's scratch slots; the caller decides with
        `kv.commit(...)` whether they become part of the prefix. `causal` and `use_draft_lora` are
        one value for all rows or one per row (B,); `num_fed`, the real tokens of each row when the
        batch is right-padded."""
        positions, span = kv.begin(tokens.shape[1], num_fed)
        ctx = ForwardContext(
            positions=positions,
            mask=kv.attention_mask(tokens.shape[1], span, causal),
            kv=kv,
            use_draft_lora=use_draft_lora,
        )
        return self.model(tokens, ctx, logit_index=logit_index)

    def execute(self, batch: DecodeBatch, fwd: Forward) -> torch.Tensor:
        """Run a planned forward over `batch`, count it for every row and time it by kind (on CUDA
        by events, read later: nothing here waits for the device)."""
        events = None
        if self.device.type == "cuda":
            events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            events[0].record()
        began = time.perf_counter()
        logits = self.forward(batch.kv, fwd.tokens, fwd.causal, fwd.use_draft_lora, fwd.logit_index, fwd.num_fed)
        if events is not None:
            events[1].record()
            batch.timings.add_events(fwd.kind, *events)
        else:
            batch.timings.add(fwd.kind, time.perf_counter() - began)
        batch.num_forwards = [n + 1 for n in batch.num_forwards]
        return logits
