"""Decode-phase forwards as CUDA graphs, for a model on a GPU.

Why: an eager forward on a GPU is bound by launches and the host. NLD-8B's AR step took 36.9 ms on
an H100 against a weight-streaming floor of 5.07 ms (issue 11): some 700 kernels launched one by one
from Python. A CUDA graph replays all of a step's kernels from one launch.

A graph has fixed shapes and reads and writes fixed addresses, so each one is captured for a bucket,
over static input buffers of that bucket's size:
- the pass's kind (`compiled.pass_kind`: `last`, `all`, `draft`). The draft LoRA flags are an
  input of the draft graph, so its replays run the LoRA; a draft graph captured without it would
  silently lose acceptance;
- the batch size, rounded up to a power of two (`BATCH_BUCKETS`);
- the pass width T: 1 for AR steps and one-token passes, the block (or block + 1) for the others;
- the key span, rounded up to a power-of-two number of pages.
Prefills (any width, once per request) stay eager.

A pass is copied into its bucket's buffers. Pad rows feed token 0 at position 0, write their K/V to
the pool's trash page and attend its first slot only (finite; their outputs are dropped). A real
row's pad keys are trash slots behind a False mask. Every op treats rows independently, so real rows
get the eager pass's outputs: tests/test_cuda_graphs.py checks the buffers token for token on the
CPU, run eagerly in place of a replay, and the captured graphs against eager on a GPU.

The graphs stop at the final norm and the head (one GEMM) runs eager on the replay's hidden states.
So a graph keeps a (B, T', hidden) output, not (B, T', V) logits: those are 1.1 GB at batch 64,
33 positions and a 131k vocabulary, and a grid of graphs that each kept one would not fit.

Graphs write the pool's K/V in place, so they belong to one pool (`bind`; the runner reuses that
pool for every engine it can serve). They share one memory pool, so a replay may overwrite another
graph's output; the engine has read it by then, since a step consumes its logits before the next
forward.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from trimode.engine.compiled import PassFunction, flat_inputs, pass_kind
from trimode.forward import Forward
from trimode.kv_cache import KVCache, KVPool, num_pages
from trimode.model.transformer import Part, Transformer

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE

BATCH_BUCKETS = tuple(2**i for i in range(10))  # 1 .. 512 rows

Bucket = tuple[str, int, int, int]  # (kind, batch, width, span)
Replay = Callable[[], torch.Tensor]


def batch_bucket(rows: int) -> int | None:
    """The smallest batch bucket holding `rows`, or None (more rows than the largest: eager)."""
    return next((b for b in BATCH_BUCKETS if b >= rows), None)


def span_bucket(span: int, page_size: int) -> int:
    """`span` key slots rounded up to a power-of-two number of pages."""
    return page_size * (1 << (num_pages(span, page_size) - 1).bit_length())


class StaticPass:
    """One bucket's static inputs, and the forward over them (to hidden states, no head)."""

    def __init__(self, model: Transformer, bucket: Bucket, pool: KVPool) -> None:
        kind, batch, width, span = bucket
        self.bucket, self.fn = bucket, PassFunction(model, kind, head=False)
        self.pool = pool
        trash = pool.trash * pool.page_size
        self.input_ids = torch.zeros(batch, width, dtype=torch.long, device=pool.device)
        self.positions = torch.zeros(batch, width, dtype=torch.long, device=pool.device)
        self.mask = torch.zeros(batch, 1, width, span, dtype=torch.bool, device=pool.device)
        self.mask[..., 0] = True
        self.write_slots = torch.full((batch, width), trash, dtype=torch.long, device=pool.device)
        self.key_slots = torch.full((batch, span), trash, dtype=torch.long, device=pool.device)
        # `last`: the logit index per row; `draft`: the draft LoRA flag per position.
        extras = {"last": ((batch,), torch.long), "draft": ((batch, width), torch.bool)}
        self.extra = []
        if kind in extras:
            shape, dtype = extras[kind]
            self.extra = [torch.zeros(shape, dtype=dtype, device=pool.device)]
        self.trash = trash

    def fill(self, part: Part) -> int:
        """Copy a begun part into the buffers, padding rows and keys; returns its number of rows."""
        input_ids, positions, mask, write_slots, key_slots, _, _, extra = flat_inputs(part, self.bucket[0])
        b, s = input_ids.shape[0], mask.shape[-1]
        for buffer, values, pad in (
            (self.input_ids, input_ids, 0),
            (self.positions, positions, 0),
            (self.write_slots, write_slots.view(b, -1), self.trash),
            *((x, y, 0) for x, y in zip(self.extra, extra)),
        ):
            buffer[:b].copy_(values)
            buffer[b:].fill_(pad)
        self.key_slots.fill_(self.trash)
        self.key_slots[:b, :s].copy_(key_slots.view(b, s))
        self.mask.zero_()
        self.mask[:b, ..., :s].copy_(mask)
        self.mask[b:, ..., 0] = True
        return b

    def run(self) -> torch.Tensor:
        """The forward over the buffers: hidden states (batch, T', hidden)."""
        slots = self.write_slots.view(-1), self.key_slots.view(-1)
        return self.fn(self.input_ids, self.positions, self.mask, *slots, self.pool.k, self.pool.v, self.extra)


class CudaGraphs:
    """The graphs of one model over one KV pool: AR steps captured at start-up (`prepare`), other
    decode passes on their first use. `capture` turns a bucket's `StaticPass` into its replay (a
    CUDA graph's by default; tests run the buffers eagerly instead)."""

    def __init__(self, model: Transformer, capture: Callable[[StaticPass], Replay] | None = None) -> None:
        self.model = model
        self.pool: KVPool | None = None
        self._capture = capture or self._cuda_graph
        self._graphs: dict[Bucket, tuple[StaticPass, Replay] | None] = {}  # None: capture failed, eager
        self._mempool: _POOL_HANDLE | None = None
        self.seconds = 0.0  # spent capturing
        self.bytes = 0  # GPU memory the graphs and their buffers reserved

    @property
    def buckets(self) -> list[Bucket]:
        """The buckets that have a graph, sorted."""
        return sorted(bucket for bucket, entry in self._graphs.items() if entry is not None)

    def bind(self, pool: KVPool) -> None:
        """Make `pool` the one the graphs write; graphs over another pool are dropped."""
        if pool is not self.pool:
            self._graphs.clear()
            self.pool = pool

    def bucket(self, kv: KVCache, fwd: Forward) -> Bucket | None:
        """The bucket of `fwd` over `kv` (before `kv.begin`), or None: it runs eager."""
        kind = pass_kind(fwd, self.model.has_draft_lora)
        rows, width = fwd.tokens.shape
        batch = batch_bucket(rows)
        if kv.pool is not self.pool or fwd.kind == "prefill" or kind is None or batch is None:
            return None
        return kind, batch, width, span_bucket(max(kv.lengths) + width, kv.pool.page_size)

    def takes(self, kv: KVCache, fwd: Forward) -> bool:
        bucket = self.bucket(kv, fwd)
        return bucket is not None and self._graphs.get(bucket, True) is not None

    def __call__(self, kv: KVCache, part: Part, fwd: Forward) -> torch.Tensor:
        """`fwd`'s logits, by replaying its bucket's graph (captured now if it is new). `part` is
        the pass begun over `kv` (gathered keys, dense mask), which `takes` accepted."""
        bucket = self.bucket(kv, fwd)  # `begin` left the lengths alone: the bucket `takes` saw
        assert bucket is not None, "a pass `takes` refused"
        entry = self._graphs[bucket] if bucket in self._graphs else self._add(bucket)
        if entry is None:
            return self.model.forward_parts([part])[0]
        static, replay = entry
        rows = static.fill(part)
        return self.model.logits(replay()[:rows])

    @torch.inference_mode()
    def prepare(self, max_batch: int, max_span: int) -> int:
        """Capture the AR step (T = 1) at every batch bucket up to `max_batch` and every span bucket
        up to `max_span` whose keys fit the pool. Returns how many graphs were captured now."""
        pool = self.pool
        if pool is None:
            raise RuntimeError("bind() a KV pool before capturing graphs over it")
        before = len(self._graphs)
        top = batch_bucket(max_batch) or BATCH_BUCKETS[-1]
        spans = []
        span = pool.page_size
        while span <= span_bucket(max_span, pool.page_size):
            spans.append(span)
            span *= 2
        for batch in (b for b in BATCH_BUCKETS if b <= top):
            for span in spans:
                if (batch == 1 or batch * span <= pool.num_tokens) and ("last", batch, 1, span) not in self._graphs:
                    self._add(("last", batch, 1, span))
        return len(self._graphs) - before

    def _add(self, bucket: Bucket) -> tuple[StaticPass, Replay] | None:
        began, pool = time.perf_counter(), self.pool
        assert pool is not None, "bind() a KV pool first"
        cuda = pool.device.type == "cuda"
        reserved = torch.cuda.memory_reserved(pool.device) if cuda else 0
        static = StaticPass(self.model, bucket, pool)
        try:
            entry = static, self._capture(static)
        except torch.cuda.OutOfMemoryError:
            print(f"trimode: no GPU memory to capture a graph for {bucket}; that pass runs eager", file=sys.stderr)
            entry = None
        self._graphs[bucket] = entry
        self.seconds += time.perf_counter() - began
        if cuda:
            self.bytes += torch.cuda.memory_reserved(pool.device) - reserved
        return entry

    def _cuda_graph(self, static: StaticPass) -> Replay:
        if self._mempool is None:
            self._mempool = torch.cuda.graph_pool_handle()
        # Warm up outside the graph, on a side stream as capture requires: cuBLAS handles and
        # workspaces are created here, not inside the capture. It writes only the trash page.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            static.run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._mempool):
            output = static.run()

        def replay() -> torch.Tensor:
            graph.replay()
            return output

        return replay
