"""ModelRunner: the only caller of the model. Runs one forward over a KV cache with a given
attention pattern, and, for a decoder's planned forward, counts and times it."""

from __future__ import annotations

import time

import torch

from trimode.decoding.base import DecodeBatch, Forward
from trimode.engine.compiled import MAX_WEIGHT_BYTES, CompiledForward
from trimode.kv_cache import PAGE_SIZE, KVCache, KVPool, num_pages
from trimode.model.transformer import ForwardContext, Part, Transformer


class ModelRunner:
    def __init__(self, model: Transformer, compile: str | bool = False) -> None:
        """`compile`: one-batch forwards run as compiled programs (engine/compiled.py) - "auto" those
        already in the cache, True also compiling the missing ones, False none (eager)."""
        self.model = model
        if compile not in (True, False, "auto"):
            raise ValueError(f"compile must be True, False or 'auto'; got {compile!r}")
        small_cpu = model.diffusion_head.weight.device.type == "cpu" and model.weight_bytes <= MAX_WEIGHT_BYTES
        use = compile is True or (compile == "auto" and small_cpu)
        self.compiled = CompiledForward(model, build=compile is True) if use else None
        if compile == "auto" and self.compiled is not None:
            self.compiled.prepare()  # loads what the cache holds (under a second each), compiles nothing
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

    @property
    def fuses_parts(self) -> bool:
        """Whether a part added to a forward costs only its tokens' share of it: so when forwards
        run eager. A compiled program takes one part, so adding one would run the whole forward
        eager; a forward of its own is then the cheaper choice."""
        return self.compiled is None or not self.compiled.loaded

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
        return self.forward_parts([(kv, Forward("", tokens, causal, use_draft_lora, logit_index, num_fed))])[0]

    @torch.inference_mode()
    def forward_parts(self, parts: list[tuple[KVCache, Forward]]) -> list[torch.Tensor]:
        """Several batches' forwards as one model forward (`Transformer.forward_parts`): each gets
        the logits `forward` would give it alone."""
        # Several parts stay eager: the compiled programs take one.
        compiled = self.compiled is not None and len(parts) == 1 and self.compiled.takes(parts[0][1])
        model_parts = []
        for kv, fwd in parts:
            t = fwd.tokens.shape[1]
            positions, span = kv.begin(t, fwd.num_fed, gather=compiled)
            mask = kv.attention_mask(t, span, fwd.causal, dense=compiled)
            model_parts.append(
                Part(fwd.tokens, ForwardContext(positions, mask, kv.view, fwd.use_draft_lora), fwd.logit_index)
            )
        if compiled:
            return [self.compiled(model_parts[0], parts[0][1])]
        return self.model.forward_parts(model_parts)

    def execute(self, parts: list[tuple[DecodeBatch, Forward]]) -> tuple[list[torch.Tensor], float]:
        """Run planned forwards of one or more batches as one model forward; count it for every row
        and time it, under each batch's own kind, as the time its rows waited (on CUDA by events,
        read later: nothing here waits for the device). Returns the logits and the host seconds."""
        events = None
        if self.device.type == "cuda":
            events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            events[0].record()
        began = time.perf_counter()
        logits = self.forward_parts([(batch.kv, fwd) for batch, fwd in parts])
        if events is not None:
            events[1].record()
        seconds = time.perf_counter() - began
        for batch, fwd in parts:
            if events is not None:
                batch.timings.add_events(fwd.kind, *events)
            else:
                batch.timings.add(fwd.kind, seconds)
            batch.num_forwards = [n + 1 for n in batch.num_forwards]
        return logits, seconds
