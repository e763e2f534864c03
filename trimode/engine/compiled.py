"""One model forward as a frozen program compiled ahead of time (torch.export + AOTInductor), for
the engine's one-batch passes on a CPU.

On this CPU the embedded model's forward is bound by how it streams its weights, not by arithmetic:
a batch-1 AR step's 57 matrix products read 27 MB, and MKL's sgemm at small M reads them at 8-10
GB/s (2.4 ms of products alone) around some 200 eager ops of dispatch. Frozen weights let inductor
pre-pack every weight for its C++ GEMM template (`max_autotune`, backends CPP and ATen, the faster
kept per product) and fuse the norms, RoPE, SwiGLU and residuals; measured on the embedded model, a
batch-1 AR step falls from 10.3 ms eager (5.6 ms under plain torch.compile) to 1.4 ms, and a 16-token
pass to 4.3 ms.

Freezing puts the weights into the program, so the program is written once to disk, keyed by the
weights, the config, the code that traces it and the torch version, and a later process loads it in
under a second instead of compiling (about a minute per program on 2 cores; inductor cannot cache frozen
graphs itself because their packed weights do not pickle).

The program takes only tensors (the tokens, positions, a dense (B, 1, T, S) mask, the pool's
per-layer K/V and the pass's slot maps, `KVView`, always gathered); batch size, pass width, key span
and pool size are symbolic, so three programs serve every one-batch pass of every mode:
- `last`: logits at one position per row (prefills and prefill chunks, AR steps, one-token passes);
- `all`: logits at every position (self-spec verify, diffusion denoise and commit);
- `draft`: every position with the draft LoRA on per position (self-spec drafts, alone or beside
  verifying rows; quadratic self-spec's verifier chain and draft groups); without a draft LoRA a
  draft is an `all` pass.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from trimode import kv_cache
from trimode.forward import Forward
from trimode.kv_cache import KVView
from trimode.model import rope, transformer
from trimode.model.transformer import ForwardContext, Part, Transformer

KINDS = ("last", "all", "draft")
# Each program embeds the weights, and its key hashes them at every start (~1 GB/s), so programs
# are for small CPU models like the embedded one: a 7B model in fp32 would be 28 GB per program.
MAX_WEIGHT_BYTES = 2 * 2**30
# Inductor settings of every program: frozen weights, pre-packed for the C++ GEMM template (its
# autotuning tables stay off stderr).
INDUCTOR_OPTIONS = {
    "freezing": True,
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP,ATEN",
    "autotune_num_choices_displayed": 0,
}


def default_cache_dir() -> Path:
    """Where compiled programs are kept: $TRIMODE_CACHE_DIR, else ~/.cache/trimode/compiled."""
    root = os.environ.get("TRIMODE_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "trimode" / "compiled"


def pass_kind(fwd: Forward, has_draft_lora: bool) -> str | None:
    """Which kind of one-part program runs `fwd` (`last`, `all`, `draft`), or None: it runs eager
    (logits at chosen positions with the draft LoRA on: a prefill that drafts)."""
    lora = fwd.use_draft_lora if isinstance(fwd.use_draft_lora, bool) else True
    if fwd.logit_index is not None and fwd.logit_index.dim() == 2:
        return None  # several positions per row (a prefill that drafts): traced with one
    if lora and has_draft_lora:
        return "draft" if fwd.logit_index is None else None
    return "last" if fwd.logit_index is not None or fwd.tokens.shape[1] == 1 else "all"


class PassFunction(nn.Module):
    """One part's forward over the pool, as a function of tensors only: what a compiled program
    traces and a CUDA graph captures. `extra` is [] (`all`), [logit_index] (`last`) or [draft LoRA
    flag per position, (B, T)] (`draft`). Returns the logits, or with `head=False` the final-normed hidden
    states they come from (`Transformer.logits`)."""

    def __init__(self, model: Transformer, kind: str, head: bool = True) -> None:
        super().__init__()
        self.model, self.kind, self.head = model, kind, head

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        write_slots: torch.Tensor,
        key_slots: torch.Tensor,
        k: list[torch.Tensor],
        v: list[torch.Tensor],
        extra: list[torch.Tensor],
    ) -> torch.Tensor:
        lora = extra[0] if self.kind == "draft" else False
        ctx = ForwardContext(positions, mask, KVView(k, v, write_slots, key_slots), lora)
        part = Part(input_ids, ctx, extra[0] if self.kind == "last" else None)
        return self.model.forward_parts([part], head=self.head)[0]


def flat_inputs(part: Part, kind: str) -> tuple:
    """A begun part as `PassFunction`'s arguments, every tensor contiguous at its full size."""
    ctx, view = part.ctx, part.ctx.kv
    if view is None or view.run is not None or not isinstance(ctx.mask, torch.Tensor):
        raise ValueError("a compiled forward needs a gathered KV view and a dense mask (KVCache.begin(gather=True))")
    b, t = part.input_ids.shape
    if kind == "last":
        # A one-token pass wanting every position wants its only one.
        extra = [part.logit_index if part.logit_index is not None else part.input_ids.new_zeros(b)]
    elif kind == "draft":
        lora = torch.as_tensor(ctx.use_draft_lora, device=part.input_ids.device)
        extra = [(lora[:, None] if lora.dim() == 1 else lora).expand(b, t)]  # one, per row or per position
    else:
        extra = []
    # A program reads its inputs by the traced sizes and strides and checks neither: every input
    # contiguous, and the mask at its full (B, 1, T, S) (a bidirectional pass builds it (B, 1, 1, S)).
    mask = ctx.mask.expand(b, 1, t, ctx.mask.shape[-1])
    tensors = (part.input_ids, ctx.positions, mask, view.write_slots, view.key_slots)
    return (*(x.contiguous() for x in tensors), view.k, view.v, [x.contiguous() for x in extra])


class CompiledForward:
    """The three programs of one model, loaded from the cache or compiled on first use (`build`),
    each returning the eager forward's logits to float rounding (tested token for token)."""

    def __init__(self, model: Transformer, cache_dir: Path | None = None, build: bool = True) -> None:
        if model.diffusion_head.weight.device.type != "cpu":
            raise ValueError("compiled forwards are built for the CPU; on a GPU run eager (leave out --compile)")
        if model.weight_bytes > MAX_WEIGHT_BYTES:
            raise ValueError(
                f"compiled forwards embed the weights, and this model has {model.weight_bytes / 2**30:.1f} GiB "
                f"(at most {MAX_WEIGHT_BYTES / 2**30:.0f} GiB): run it eager (leave out --compile)"
            )
        self.model, self.build = model, build
        self.cache_dir = cache_dir or default_cache_dir()
        self._key = _model_key(model)
        self._programs: dict[str, Callable[[list[torch.Tensor]], list[torch.Tensor]]] = {}
        self._missing: set[str] = set()  # kinds neither cached nor to be built: run eager
        self.seconds: dict[str, float] = {}  # per kind: time to compile it (or to load it from the cache)

    @property
    def loaded(self) -> bool:
        """Whether any program is loaded (some forwards run compiled)."""
        return bool(self._programs)

    def prepare(self) -> dict[str, float]:
        """Load every program this model's passes need now, compiling the missing ones if `build`
        (`LLM(compile=True)`: a server compiles at start-up, not on its first requests). Returns
        seconds per program."""
        for kind in KINDS if self.model.has_draft_lora else ("last", "all"):
            if kind not in self._programs:
                self._load(kind)
        return self.seconds

    def takes(self, fwd: Forward) -> bool:
        """Whether `fwd` runs compiled (its program is loaded, cached, or will be built now)."""
        kind = pass_kind(fwd, self.model.has_draft_lora)
        if kind is None:
            return False
        return kind in self._programs or (kind not in self._missing and self._load(kind))

    def __call__(self, part: Part, fwd: Forward) -> torch.Tensor:
        """Run `fwd`'s program (`takes(fwd)` has loaded it) on `part`, its begun view."""
        kind = pass_kind(fwd, self.model.has_draft_lora)
        if kind not in self._programs:
            raise RuntimeError("this pass has no loaded compiled program; check takes() first")
        *tensors, k, v, extra = flat_inputs(part, kind)
        return self._programs[kind]([*tensors, *k, *v, *extra])[0]

    def path(self, kind: str) -> Path:
        # The key hashes the weights, so it differs by dtype already; the name says it to a reader.
        dtype = str(self.model.diffusion_head.weight.dtype).removeprefix("torch.")
        return self.cache_dir / f"{kind}-{dtype}-{self._key}.pt2"

    def _load(self, kind: str) -> bool:
        path = self.path(kind)
        began = time.perf_counter()
        if path.is_file():
            try:
                self._programs[kind] = _load_program(path)
            except (RuntimeError, OSError, ValueError) as e:
                # A torn or foreign file must not fail forwards: rebuild it, or run this kind eager.
                then = "recompiling" if self.build else "running eager"
                print(f"trimode: cannot load {path} ({e}); {then}", file=sys.stderr)
        if kind not in self._programs:
            if not self.build:
                self._missing.add(kind)
                return False
            print(
                f"trimode: compiling the {kind!r} forward once (about a minute on 2 cores), into {path}",
                file=sys.stderr,
            )
            self._compile(kind, path)
            self._programs[kind] = _load_program(path)
        self.seconds[kind] = time.perf_counter() - began
        return True

    def _compile(self, kind: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        example, dims = _example(self.model, kind)
        with torch.no_grad():
            program = torch.export.export(PassFunction(self.model, kind), example, dynamic_shapes=dims, strict=False)
            partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.pt2")
            # A copy: AOTInductor adds its own settings to the dict it is given (and so to our key).
            options = dict(INDUCTOR_OPTIONS)
            torch._inductor.aoti_compile_and_package(program, package_path=str(partial), inductor_configs=options)
        os.replace(partial, path)  # whole or absent: a concurrent or killed compile leaves no torn file


def _load_program(path: Path) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    # The loader's flat entry point: the package's own __call__ re-parses its input spec (JSON)
    # and walks the pytree on every call, 0.2 ms of a 1.7 ms AR step; ours is flat already.
    return torch._inductor.aoti_load_package(str(path)).loader.boxed_run


def _example(model: Transformer, kind: str) -> tuple[tuple, tuple]:
    """Inputs to trace with, and which of their dimensions are symbolic. Every size differs from
    every other and from 0 and 1 (B=2, T=3, S=5, ...), so tracing ties none of them together."""
    cfg = model.config
    device = model.diffusion_head.weight.device
    pool = model.new_kv_pool(9, 16)
    kv = kv_cache.KVCache(pool, 2)
    kv.begin(2)
    kv.commit()
    positions, span = kv.begin(3, gather=True)
    mask = kv.attention_mask(3, span, True, dense=True)
    tokens = torch.full((2, 3), cfg.bos_token_id, dtype=torch.long, device=device)
    lora = torch.tensor([True, False], device=device)
    logit_index = torch.tensor([2, 1], device=device) if kind == "last" else None
    part = Part(tokens, ForwardContext(positions, mask, kv.view, lora if kind == "draft" else False), logit_index)
    example = flat_inputs(part, kind)
    a = Dim.AUTO
    layers = [{0: a}] * cfg.num_hidden_layers
    extra = [{0: a, 1: a} if kind == "draft" else {0: a}] * len(example[-1])
    dims = ({0: a, 1: a}, {0: a, 1: a}, {0: a, 2: a, 3: a}, {0: a}, {0: a}, layers, layers, extra)
    return example, dims


def _model_key(model: Transformer) -> str:
    """What a program depends on: the weights (frozen into it), the config, the code it traces,
    the inductor settings and the torch version."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    for code in (transformer, rope, KVView, PassFunction, _example):
        digest.update(inspect.getsource(code).encode())
    digest.update(json.dumps([repr(model.config), INDUCTOR_OPTIONS, torch.__version__], sort_keys=True).encode())
    return digest.hexdigest()[:20]
