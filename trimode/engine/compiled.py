"""One model forward as one compiled graph (torch.compile / inductor), for the engine's passes.

On a CPU the embedded model's forward costs its ops' dispatch, not its arithmetic: an eager AR step
is some 200 small ops, each a few microseconds of Python and dispatcher around a kernel that takes
less. Inductor fuses the elementwise work (norms, RoPE, SwiGLU, residuals) into a few C++ kernels
and leaves the matrix products to the BLAS, so a step is one call into generated code.

The graph takes only tensors: the tokens, positions, a dense (B, 1, T, S) mask, the pool and the
pass's slot maps (`KVView`, always gathered), so nothing in it depends on host values that change
from step to step. Batch size, pass width and key span are symbolic (`dynamic=True`): dynamo
specialises only sizes 0 and 1 and the Python-level choices (draft LoRA on all tokens, none, or per
token; logits at one position per row or at all), so one engine compiles a handful of graphs,
lazily, the first time each kind of pass runs, and inductor's on-disk cache makes a later process
load them instead of compiling again.
"""

from __future__ import annotations

import torch

from trimode.kv_cache import KVView
from trimode.model.transformer import ForwardContext, Part, Transformer

# Graphs one engine may need: {B = 1, B > 1} x {T = 1, T > 1} x {no LoRA, LoRA, per-token LoRA}
# x {logits at one position, at all}, with room to spare; dynamo's default would fall back to eager.
RECOMPILE_LIMIT = 64


class CompiledForward:
    """`Transformer.forward_parts` of one part, compiled. Same logits as the eager forward to
    float rounding (fused kernels sum in another order); tested token for token."""

    def __init__(self, model: Transformer) -> None:
        self.model = model
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        self._fn = torch.compile(self._forward, dynamic=True, fullgraph=True)

    def _forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        k: list[torch.Tensor],
        v: list[torch.Tensor],
        write_slots: torch.Tensor,
        key_slots: torch.Tensor,
        lora: torch.Tensor | bool,
        logit_index: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx = ForwardContext(positions, mask, KVView(k, v, write_slots, key_slots), lora)
        return self.model.forward_parts([Part(input_ids, ctx, logit_index)])[0]

    def __call__(self, part: Part) -> torch.Tensor:
        ctx, view = part.ctx, part.ctx.kv
        if view is None or view.run is not None or not isinstance(ctx.mask, torch.Tensor):
            raise ValueError(
                "a compiled forward needs a gathered KV view and a dense mask (KVCache.begin(gather=True))"
            )
        return self._fn(
            part.input_ids,
            ctx.positions,
            ctx.mask,
            view.k,
            view.v,
            view.write_slots,
            view.key_slots,
            ctx.use_draft_lora,
            part.logit_index,
        )
