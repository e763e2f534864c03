"""Training on many processes (torchrun): a 2-D DeviceMesh (dp, tp), DTensor tensor parallelism
inside a node and FSDP2 (`fully_shard` per decoder layer, then the root) across data-parallel ranks,
as torchtitan composes them. One process without torchrun trains the plain module.

The split is `model/tensor_parallel.py`'s (column-parallel q/k/v/gate/up, row-parallel o/down, the
vocabulary split over the embedding and `diffusion_head`), expressed as DTensor styles so autograd
and checkpoints know the layout. The joint loss divides by global token counts, so gradients must
be summed over data-parallel ranks: FSDP averages them, so each rank's loss is scaled by the number
of data-parallel ranks (`Ranks.grad_scale`; exact for powers of two). FSDP's divide factor of 1
would say it directly, but it reduces with PREMUL_SUM, which gloo lacks.
"""

from __future__ import annotations

import functools
import math
import resource
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from trimode.distributed import join_torchrun, launched_by_torchrun
from trimode.model.tensor_parallel import LAYER_PLAN, check_tp
from trimode.model.transformer import Transformer


@dataclass
class Ranks:
    """Where this process stands: its data-parallel rank (which rows it reads) and the mesh."""

    rank: int = 0
    world: int = 1
    dp_rank: int = 0
    dp_world: int = 1
    tp: int = 1
    device: torch.device = torch.device("cpu")
    mesh: DeviceMesh | None = None  # None: one process, the plain module

    @property
    def grad_scale(self) -> int:
        """What each rank's loss is multiplied by so FSDP's average over data-parallel ranks is their sum."""
        return self.dp_world if self.mesh is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.mesh is not None:
            dist.barrier()

    def sum_over_dp(self, values: list[float]) -> list[float]:
        """Each value summed over the data-parallel ranks (one all-reduce)."""
        if self.mesh is None or self.dp_world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.mesh["dp"].get_group())
        return t.tolist()


@functools.cache
def init_ranks(device: torch.device, tp: int) -> Ranks:
    """This process's `Ranks`: under torchrun, joins the default process group (NCCL on GPUs, gloo
    on CPUs) and builds the (dp, tp) mesh; otherwise one plain process. Once per process and
    layout: later runs in the same process reuse the mesh."""
    if not launched_by_torchrun():
        if tp != 1:
            raise ValueError(f"--tp {tp} needs torchrun: torchrun --nproc-per-node {tp} -m trimode train ... --tp {tp}")
        return Ranks(device=device)
    device = join_torchrun(device)
    world, rank = dist.get_world_size(), dist.get_rank()
    if tp < 1 or world % tp:
        raise ValueError(f"--tp {tp} must divide the number of ranks ({world})")
    mesh = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    dp_rank = mesh.get_local_rank("dp")
    return Ranks(rank, world, dp_rank, world // tp, tp, device, mesh)


def parallelize(model: Transformer, ranks: Ranks, bf16: bool, activation_checkpointing: bool) -> None:
    """Shard `model` in place over `ranks.mesh` (TP first, then FSDP2); with `bf16`, parameters
    gather in bf16 and gradients reduce in fp32 (FSDP2's MixedPrecisionPolicy)."""
    model.activation_checkpointing = activation_checkpointing
    if ranks.mesh is None:
        return
    if ranks.tp > 1:
        check_tp(model.config, ranks.tp, replicate_kv=False)
        tp_mesh = ranks.mesh["tp"]
        for layer in model.encoder.layers:
            plan: dict[str, ParallelStyle] = {
                path: ColwiseParallel() if dim == 0 else RowwiseParallel() for path, dim in LAYER_PLAN.items()
            }
            parallelize_module(layer, tp_mesh, plan)
        parallelize_module(
            model,
            tp_mesh,
            {
                "encoder.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
                "diffusion_head": ColwiseParallel(output_layouts=Replicate()),
            },
        )
    # Without bf16, the default policy: parameters and reductions in their own dtype.
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    )
    dp = ranks.mesh["dp"]
    for layer in model.encoder.layers:
        fully_shard(layer, mesh=dp, mp_policy=policy)
    fully_shard(model, mesh=dp, mp_policy=policy)
    # The logits are a view of the head's output; the objective only reads them.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, ranks: Ranks) -> float:
    """Clip the gradients to a global L2 norm of `max_norm`; returns the norm before clipping.

    Works on any mix of plain and DTensor gradients (FSDP shards on dp, TP shards on tp,
    replicated norms): each rank sums the squares of its local pieces, dividing each by how many
    ranks hold a copy of it, and one all-reduce adds them up."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.zeros((), dtype=torch.float64, device=ranks.device)
    for g in grads:
        local, copies = g, ranks.world
        if isinstance(g, DTensor):
            local = g.to_local()
            mesh = g.device_mesh
            shards = math.prod(mesh.size(i) for i, p in enumerate(g.placements) if not p.is_replicate())
            copies = ranks.world // shards
        total += local.detach().double().pow(2).sum() / copies
    if ranks.mesh is not None:
        dist.all_reduce(total)
    norm = float(total.sqrt())
    coef = min(1.0, max_norm / (norm + 1e-6))
    if coef < 1.0:
        for g in grads:
            (g.to_local() if isinstance(g, DTensor) else g).mul_(coef)
    return norm


def memory_per_rank(model: nn.Module, optimizer: torch.optim.Optimizer, ranks: Ranks) -> list[dict[str, float]]:
    """Per rank: the MiB of the parameter and optimizer-state shards it holds, and its peak memory
    (resident set on a CPU, allocated on a GPU). Every rank must call it."""

    def nbytes(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = sum(nbytes(p) for p in model.parameters())
    state = sum(nbytes(v) for entries in optimizer.state.values() for v in entries.values() if torch.is_tensor(v))
    peak = (
        torch.cuda.max_memory_allocated(ranks.device)
        if ranks.device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    )
    mine = {"rank": ranks.rank, "params_mib": params / 2**20, "optimizer_mib": state / 2**20, "peak_mib": peak / 2**20}
    if ranks.mesh is None:
        return [mine]
    every: list = [None] * ranks.world
    dist.all_gather_object(every, mine)
    return every
