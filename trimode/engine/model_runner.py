"""ModelRunner: the only caller of the model. Runs one forward over a KV cache with a given
attention pattern, and, for a decoder's planned forward, counts and times it."""

from __future__ import annotations

import sys
import time

import torch

from trimode.engine.auto import AutoPolicy
from trimode.engine.compiled import MAX_WEIGHT_BYTES, CompiledForward
from trimode.engine.cuda_graphs import CudaGraphs
from trimode.engine.tp_workers import TensorParallelDriver
from trimode.forward import Forward
from trimode.kv_cache import PAGE_SIZE, KVCache, KVPool, num_pages
from trimode.model.transformer import ForwardContext, Part, Transformer
from trimode.timing import ForwardTimes


class ModelRunner:
    def __init__(
        self, model: Transformer, compile: str | bool = False, tp_driver: TensorParallelDriver | None = None
    ) -> None:
        """`compile`: how one-batch forwards run fast. On a CPU, as compiled programs
        (engine/compiled.py): "auto" those already in the cache, True also compiling the missing
        ones. On a GPU, decode passes as CUDA graphs (engine/cuda_graphs.py), "auto" or True. False:
        every forward eager. `tp_driver`: rank 0 of a tensor-parallel group, whose workers run
        every forward with it (eager: programs and graphs hold whole weights and no collectives)."""
        self.model = model
        if compile not in (True, False, "auto"):
            raise ValueError(f"compile must be True, False or 'auto'; got {compile!r}")
        self.tp_driver = tp_driver
        # Mode auto's policy and what it measured of this model (`engine/auto.py`), made on the
        # first auto request and kept for every engine this runner serves.
        self.auto: AutoPolicy | None = None
        compile = False if tp_driver is not None else compile
        self.config = model.config
        self.device = model.diffusion_head.weight.device
        self.dtype = model.diffusion_head.weight.dtype
        cuda = self.device.type == "cuda"
        self.graphs = CudaGraphs(model) if cuda and compile is not False else None
        small = not cuda and model.weight_bytes <= MAX_WEIGHT_BYTES
        use = (compile is True and not cuda) or (compile == "auto" and small)
        self.compiled = CompiledForward(model, build=compile is True) if use else None
        if compile == "auto" and self.compiled is not None:
            self.compiled.prepare()  # loads what the cache holds (under a second each), compiles nothing

    def new_pool(self, num_tokens: int, page_size: int) -> KVPool:
        """The KV pool for `num_tokens` slots (rounded up to whole pages of `page_size`). With CUDA
        graphs, which write one pool in place, the graphs' pool when no row holds a page of it and
        it is large enough (so offline `generate` calls, an engine each, replay the same graphs)."""
        held = self.graphs.pool if self.graphs is not None else None
        if held is not None and held.page_size == page_size and held.num_tokens >= num_tokens:
            if held.num_used_pages == 0:
                return held
        pool = self.model.new_kv_pool(num_pages(num_tokens, page_size), page_size)
        if self.tp_driver is not None:
            self.tp_driver.add_pool(pool)
        if self.graphs is not None:
            self.graphs.bind(pool)
        return pool

    def capture_graphs(self, max_batch: int, max_span: int) -> None:
        """With CUDA graphs: capture the AR step's over the pool now (`CudaGraphs.prepare`), saying
        what they took; the other decode passes are captured on first use."""
        if self.graphs is None:
            return
        began, reserved = time.perf_counter(), self.graphs.bytes
        captured = self.graphs.prepare(max_batch, max_span)
        if captured:
            print(
                f"trimode: captured {captured} CUDA graphs of the AR step (batch <= {max_batch}, key span <= "
                f"{max_span}) in {time.perf_counter() - began:.1f} s, holding "
                f"{(self.graphs.bytes - reserved) / 2**20:.0f} MiB; --enforce-eager turns them off",
                file=sys.stderr,
            )

    def new_cache(self, batch_size: int, capacity: int, page_size: int = PAGE_SIZE) -> KVCache:
        """`batch_size` empty rows of up to `capacity` slots each, over a pool of their own."""
        return KVCache(self.new_pool(batch_size * num_pages(capacity, page_size) * page_size, page_size), batch_size)

    @property
    def fuses_parts(self) -> bool:
        """Whether a part added to a forward costs only its tokens' share of it: so when forwards
        run eager. A compiled program takes one part, so adding one would run the whole forward
        eager; a forward of its own is then the cheaper choice."""
        return self.graphs is None and (self.compiled is None or not self.compiled.loaded)

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
        # Several parts stay eager: compiled programs and CUDA graphs take one.
        (kv0, fwd0), one = parts[0], len(parts) == 1
        graphs = self.graphs if one and self.graphs is not None and self.graphs.takes(kv0, fwd0) else None
        compiled = self.compiled if one and self.compiled is not None and self.compiled.takes(fwd0) else None
        dense = graphs is not None or compiled is not None  # gathered keys and a dense mask
        model_parts = []
        for kv, fwd in parts:
            t = fwd.tokens.shape[1]
            positions, span = kv.begin(t, fwd.num_fed, gather=dense, offsets=fwd.offsets)
            mask = kv.attention_mask(t, span, fwd.causal, dense=dense, pattern=fwd.pattern)
            model_parts.append(
                Part(fwd.tokens, ForwardContext(positions, mask, kv.view, fwd.use_draft_lora), fwd.logit_index)
            )
        if graphs is not None:
            return [graphs(kv0, model_parts[0], fwd0)]
        if compiled is not None:
            return [compiled(model_parts[0], fwd0)]
        if self.tp_driver is not None:
            return self.tp_driver.run(self.model, model_parts, [kv.pool for kv, _ in parts])
        return self.model.forward_parts(model_parts)

    def execute(self, parts: list[tuple[KVCache, Forward, ForwardTimes]]) -> tuple[list[torch.Tensor], float]:
        """Run planned forwards of one or more batches (each over its KV cache) as one model
        forward, and time it in each batch's `ForwardTimes` under the batch's own kind, as the time
        its rows waited (on CUDA by events, read later: nothing here waits for the device).
        Returns the logits and the host seconds."""
        events = None
        if self.device.type == "cuda":
            events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            events[0].record()
        began = time.perf_counter()
        logits = self.forward_parts([(kv, fwd) for kv, fwd, _ in parts])
        if events is not None:
            events[1].record()
        seconds = time.perf_counter() - began
        for _, fwd, timings in parts:
            if events is not None:
                timings.add_events(fwd.kind, *events)
            else:
                timings.add(fwd.kind, seconds)
        return logits, seconds
