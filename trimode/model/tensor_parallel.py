"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019): which way each weight splits, and the
collectives of an inference forward.

One plan (`shard_range`), two executions:
- inference (`shard_model`): each rank keeps plain slices of the weights. q/k/v/gate/up are
  column-parallel (their output features split, so each rank computes its own heads and MLP
  columns with no communication); o_proj and down_proj are row-parallel (their input features
  split, so each gives a partial sum: one all-reduce each, in `DecoderLayer`). The draft LoRA on
  o_proj splits its A the same way and adds its partial delta before that one all-reduce (B is
  linear). The embedding and `diffusion_head` split the vocabulary: a rank looks up only its own
  rows (zeros elsewhere, then an all-reduce) and computes its own logit columns (then an
  all-gather). No DTensor dispatch on the hot path.
- training (`train/parallel.py`): the same split as DTensor `ColwiseParallel` / `RowwiseParallel`
  styles, whose autograd is right and whose checkpoints reshard to any world size.

KV heads split with the query heads when the ranks divide them; with more ranks than KV heads,
each KV head is replicated on the ranks whose query heads read it (vLLM does the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from trimode.config import ModelConfig

if TYPE_CHECKING:  # the model imports this module
    from trimode.model.transformer import Transformer

# Each decoder layer's projections, by their path in the layer, and the dim of the weight that
# splits: 0 (column-parallel: the output features) or 1 (row-parallel: the input features).
LAYER_PLAN = {
    "self_attn.q_proj": 0,
    "self_attn.k_proj": 0,
    "self_attn.v_proj": 0,
    "self_attn.o_proj": 1,
    "mlp.gate_proj": 0,
    "mlp.up_proj": 0,
    "mlp.down_proj": 1,
}


@dataclass
class TensorParallel:
    """This rank's place in an inference tensor-parallel group."""

    rank: int
    world: int
    group: dist.ProcessGroup | None = None  # None: the default group
    vocab_start: int = 0  # first vocabulary row this rank holds

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def embed(self, table: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        """Vocabulary-parallel lookup: ids outside this rank's rows contribute zeros to the sum."""
        local = ids - self.vocab_start
        inside = (local >= 0) & (local < table.weight.shape[0])
        h = F.embedding(local.clamp(0, table.weight.shape[0] - 1), table.weight) * inside[:, None].to(
            table.weight.dtype
        )
        return self.all_reduce(h)

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., V / world) logit columns of every rank -> (..., V), the same on every rank."""
        pieces = [torch.empty_like(logits) for _ in range(self.world)]
        dist.all_gather(pieces, logits.contiguous(), group=self.group)
        return torch.cat(pieces, -1)


def check_tp(cfg: ModelConfig, world: int, replicate_kv: bool = True) -> None:
    """Raise a clear error when `world` ranks cannot split this model."""
    if world < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1; got {world}")
    sizes = {
        "num_attention_heads": cfg.num_attention_heads,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
    }
    for name, size in sizes.items():
        if size % world:
            raise ValueError(
                f"tensor_parallel_size {world} does not divide the model's {name} ({size}); pick a divisor"
            )
    kv = cfg.num_key_value_heads
    if kv % world and not (replicate_kv and world % kv == 0):
        allowed = "divide it or be a multiple of it" if replicate_kv else "divide it"
        raise ValueError(f"tensor_parallel_size {world} must {allowed}: the model has {kv} KV heads")


def shard_range(name: str, cfg: ModelConfig, rank: int, world: int) -> tuple[int, int, int] | None:
    """(dim, start, length) of this rank's slice of weight `name` (full shapes from `cfg`), or
    None when every rank holds all of it (norms, the LoRA's B)."""
    d = cfg.head_dim
    heads = cfg.num_attention_heads // world
    if ".draft_lora.lora_A." in name:
        return 1, rank * heads * d, heads * d
    if ".draft_lora." in name:
        return None
    module = name.rsplit(".", 2)[-2]
    path = ".".join(name.split(".")[3:-1])  # encoder.layers.N.<path>.weight
    if module in ("q_proj", "o_proj"):
        return LAYER_PLAN[path], rank * heads * d, heads * d
    if module in ("k_proj", "v_proj"):
        kv = cfg.num_key_value_heads
        if kv % world == 0:
            return LAYER_PLAN[path], rank * (kv // world) * d, (kv // world) * d
        return LAYER_PLAN[path], (rank // (world // kv)) * d, d  # one KV head, shared with world / kv ranks
    if module in ("gate_proj", "up_proj", "down_proj"):
        width = cfg.intermediate_size // world
        return LAYER_PLAN[path], rank * width, width
    if module in ("embed_tokens", "diffusion_head"):
        rows = cfg.vocab_size // world
        return 0, rank * rows, rows
    return None


def shard_model(model: Transformer, cfg: ModelConfig, tp: TensorParallel) -> None:
    """Replace each weight of `model` by this rank's slice of it (on meta tensors too: the loader
    shards before it reads) and give the model its group. Idempotent only on a full model."""
    check_tp(cfg, tp.world)
    for name, param in list(model.named_parameters()):
        cut = shard_range(name, cfg, tp.rank, tp.world)
        if cut is None:
            continue
        owner = model.get_submodule(name.rsplit(".", 1)[0])
        dim, start, length = cut
        owner.weight = nn.Parameter(param.detach().narrow(dim, start, length).clone(), requires_grad=False)
        if isinstance(owner, nn.Linear):
            owner.out_features, owner.in_features = owner.weight.shape
    tp.vocab_start = tp.rank * (cfg.vocab_size // tp.world)
    model.tp = tp
