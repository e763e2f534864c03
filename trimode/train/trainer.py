"""The training loop, readable top to bottom: batch -> mask -> joint loss -> AdamW step -> eval/save.

Stage one (optional, `ar_steps`): AR loss only, a plain causal pass. Stage two: the joint objective
L = L_AR + alpha * L_diff on the doubled [x_t | x_0] sequence. Both losses are averaged over the
global token counts of the whole accumulated batch, summed over every rank's rows.

One process trains the plain module. Under torchrun (`train/parallel.py`) the model is sharded with
FSDP2 (and DTensor TP inside a node with `tp` > 1); each data-parallel rank reads its own rows of the
step's global batch (`batch_size` rows per rank and micro-batch), and the masking noise of a row is
a function of (seed, step, row), so N ranks compute the same loss, to rounding, as one process
reading the whole batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from trimode.llm import LLM, resolve_device
from trimode.model.transformer import Transformer, on_meta
from trimode.sampling_params import MODES
from trimode.tokenizer import Tokenizer
from trimode.train.data import Batcher, TextSource, stdlib_texts
from trimode.train.masking import position_dependent_masking, uniform_masking
from trimode.train.objective import LossSums, ar_loss_sums, joint_loss_sums
from trimode.train.parallel import Ranks, clip_grad_norm, init_ranks, memory_per_rank, parallelize
from trimode.train.state import full_state_dict, latest_checkpoint, load_checkpoint, save_checkpoint


@dataclass
class TrainConfig:
    out: str
    data: str = "stdlib,tasks"
    steps: int = 1000
    ar_steps: int = 0
    batch_size: int = 16  # rows per micro-batch
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    schedule: str = "cosine"  # "cosine" or "wsd" (warmup, stable, then linear decay over the last 20%)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    alpha: float = 0.3
    block_size: int = 32
    masking: str = "position"  # "position" (Efficient-DLM) or "uniform"
    half_life_ratio: float = 0.1
    eval_every: int = 0  # 0 = only at the end
    eval_examples: int = 10  # per task and mode in the periodic quick accuracy
    save_every: int = 200
    keep: int = 2
    seed: int = 0
    device: str = "auto"
    autocast: str = "auto"  # "auto" (bf16 on CUDA, off on CPU), "bf16" or "off"
    save_dtype: str = "float32"
    tp: int = 1  # tensor-parallel ranks per model replica (under torchrun)
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "grad_accum", "seq_len", "block_size", "save_every", "keep", "tp")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"train: {name} must be an integer >= 1; got {getattr(self, name)!r}")
        for name in ("ar_steps", "warmup_steps", "eval_every", "eval_examples"):
            if getattr(self, name) < 0:
                raise ValueError(f"train: {name} must be >= 0; got {getattr(self, name)!r}")
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1 and self.alpha >= 0 and self.grad_clip > 0):
            raise ValueError("train: need lr > 0, 0 <= min_lr_ratio <= 1, alpha >= 0 and grad_clip > 0")
        if not 0 < self.half_life_ratio:
            raise ValueError(f"train: half_life_ratio must be > 0; got {self.half_life_ratio}")
        choices = {
            "schedule": ("cosine", "wsd"),
            "masking": ("position", "uniform"),
            "autocast": ("auto", "bf16", "off"),
            "save_dtype": ("float32", "bfloat16", "float16"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"train: {name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(self.steps - self.warmup_steps, 1)
        floor = self.min_lr_ratio
        if self.schedule == "cosine":
            return self.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
        return self.lr * (1.0 if progress < 0.8 else floor + (1 - floor) * (1 - progress) / 0.2)


def _noise(cfg: TrainConfig, eligible: torch.Tensor, step: int, rows: range) -> tuple[torch.Tensor, torch.Tensor]:
    """The masking of rows `rows` of step `step`: each row's from a generator of its own, so a row is
    masked the same on any rank and in any micro-batch. (is_masked, p_mask) (N, L) on the CPU."""
    mask_fn = position_dependent_masking if cfg.masking == "position" else uniform_masking
    kwargs = {"half_life_ratio": cfg.half_life_ratio} if cfg.masking == "position" else {}
    pieces = []
    for i, row in enumerate(rows):
        gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 1_000_033 + row)
        pieces.append(mask_fn(eligible[i : i + 1], cfg.block_size, gen, **kwargs))
    return torch.cat([m for m, _ in pieces]), torch.cat([p for _, p in pieces])


def _step_losses(
    model: Transformer,
    cfg: TrainConfig,
    micro: list[tuple[range, torch.Tensor, torch.Tensor]],
    step: int,
    ranks: Ranks,
    autocast: bool,
) -> tuple[float, float]:
    """Forward + backward over this rank's micro-batches of one step; returns the step's (L_AR,
    L_diff) over the global batch, for logging."""
    joint = step >= cfg.ar_steps
    num_ar, num_diff = ranks.sum_over_dp(
        [sum(float(e[:, 1:].sum()) for _, _, e in micro), sum(float(e.sum()) for _, _, e in micro)]
    )
    device = ranks.device
    ar_total, diff_total = 0.0, 0.0
    for rows, x0, eligible in micro:
        noise = _noise(cfg, eligible, step, rows) if joint else None
        x0, eligible = x0.to(device), eligible.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            if noise is not None:
                is_masked, p_mask = (t.to(device) for t in noise)
                sums: LossSums = joint_loss_sums(
                    model, x0, eligible, is_masked, p_mask, model.config.mask_token_id, cfg.block_size
                )
            else:
                sums = ar_loss_sums(model, x0, eligible)
        loss = sums.ar / max(num_ar, 1) + (cfg.alpha * sums.diff / max(num_diff, 1) if joint else 0.0)
        (loss * ranks.grad_scale).backward()
        ar_total += sums.ar.item() / max(num_ar, 1)
        diff_total += sums.diff.item() / max(num_diff, 1)
    ar_total, diff_total = ranks.sum_over_dp([ar_total, diff_total])
    return ar_total, diff_total


@torch.no_grad()
def heldout_losses(model: Transformer, cfg: TrainConfig, held_out: TextSource) -> tuple[float, float]:
    """(L_AR, L_diff) of the joint objective on a fixed batch of held-out text with fixed noise."""
    device = model.diffusion_head.weight.device
    rng = random.Random(cfg.seed)
    rows = [held_out.row(rng, cfg.seq_len).tokens for _ in range(8)]
    x0 = torch.tensor([r for r in rows if len(r) == cfg.seq_len], device=device)
    eligible = torch.ones_like(x0, dtype=torch.bool)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    is_masked, p_mask = uniform_masking(eligible, cfg.block_size, gen)
    sums = joint_loss_sums(model, x0, eligible, is_masked, p_mask, model.config.mask_token_id, cfg.block_size)
    return sums.ar.item() / sums.num_ar, sums.diff.item() / sums.num_diff


def quick_eval(model: Transformer, tokenizer: Tokenizer, cfg: TrainConfig, held_out: TextSource) -> dict:
    from trimode.evaluate import task_accuracy

    model.eval()
    llm = LLM.from_parts(model, tokenizer)
    ar, diff = heldout_losses(model, cfg, held_out)
    report: dict[str, Any] = {"heldout_loss_ar": round(ar, 4), "heldout_loss_diff": round(diff, 4)}
    if cfg.eval_examples:
        acc = task_accuracy(llm, list(MODES), n=cfg.eval_examples, use_tqdm=False, block_length=cfg.block_size)
        report["accuracy"] = {m: {k: round(v, 3) for k, v in row.items()} for m, row in acc.items()}
    model.train()
    return report


def train(
    cfg: TrainConfig,
    model: Transformer,
    tokenizer_dir: Path,
    resume: bool = False,
    extra_args: dict[str, Any] | None = None,
    show_progress: bool = True,
    stop_at: int | None = None,
) -> list[dict[str, Any]]:
    """Train `model` in place; checkpoints go to cfg.out. Returns the per-step log of this run.
    Under torchrun every rank calls this with the same (identically initialised) model.

    stop_at: end this run after that step, with a checkpoint there (a long run split across
    sessions; `resume` continues it exactly, on any number of ranks)."""
    ranks = init_ranks(resolve_device(cfg.device), cfg.tp)
    device = ranks.device
    bf16 = cfg.autocast == "bf16" or (cfg.autocast == "auto" and device.type == "cuda")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    model_cfg = model.config
    batcher = Batcher(
        cfg.data, tokenizer, model_cfg.eos_token_id[0], model_cfg.pad_token_id or 0, cfg.seq_len, cfg.seed
    )
    # Shard before moving: FSDP2 and DTensor move each module's states to the mesh's device as they
    # shard them, so a GPU never holds the whole model (the host still holds one copy per rank).
    # Sharded, bf16 lives in FSDP2's parameter gathers; one process autocasts.
    parallelize(model, ranks, bf16, cfg.activation_checkpointing)
    model.to(device).train()
    autocast = bf16 and ranks.mesh is None
    optimizer = _optimizer(model, cfg)
    start = 0
    if resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise ValueError(f"--resume: no checkpoint in {out} (it has no `latest` file)")
        start = load_checkpoint(ckpt, model, optimizer)
    args = {**dataclasses.asdict(cfg), **(extra_args or {}), "model": model_cfg.to_hf(), "world_size": ranks.world}
    held_out = TextSource(stdlib_texts(held_out=True), tokenizer, model_cfg.eos_token_id[0])
    log: list[dict[str, Any]] = []
    tokens_per_step = cfg.batch_size * ranks.dp_world * cfg.grad_accum * cfg.seq_len  # over all ranks
    bar = tqdm(
        total=cfg.steps,
        initial=start,
        disable=not (show_progress and ranks.is_main),
        unit="step",
        dynamic_ncols=True,
        mininterval=2.0,
    )
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(step)
        ar, diff = _step_losses(model, cfg, _micro_batches(batcher, cfg, ranks, step), step, ranks, autocast)
        grad_norm = clip_grad_norm(list(model.parameters()), cfg.grad_clip, ranks)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        entry: dict[str, Any] = {
            "step": step + 1,
            "loss_ar": ar,
            "loss_diff": diff,
            "lr": cfg.lr_at(step),
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_step / (time.perf_counter() - t0),
        }
        log.append(entry)
        bar.set_postfix(ar=f"{ar:.3f}", diff=f"{diff:.3f}", tok_s=f"{entry['tokens_per_s']:.0f}")
        bar.update(1)
        done = step + 1 == cfg.steps
        paused = step + 1 == stop_at
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or done:
            report = _eval_on_main(model, tokenizer, cfg, held_out, ranks)
            if report is not None:
                entry["eval"] = report
                bar.write(json.dumps({"step": step + 1, **report}))
        if (step + 1) % cfg.save_every == 0 or done or paused:
            save_checkpoint(out, step + 1, model, tokenizer_dir, optimizer, args, cfg.save_dtype, cfg.keep, ranks)
        if done or paused:
            entry["memory"] = memory_per_rank(model, optimizer, ranks)
        if ranks.is_main:
            with (out / "log.jsonl").open("a") as f:
                f.write(json.dumps(entry) + "\n")
        if paused:
            break
    bar.close()
    return log


def _optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the weight matrices only; embeddings, norm gains and biases are
    not decayed (the usual split in GPT-style training)."""
    decayed = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    others = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    return torch.optim.AdamW(
        [{"params": decayed, "weight_decay": cfg.weight_decay}, {"params": others, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )


def _micro_batches(
    batcher: Batcher, cfg: TrainConfig, ranks: Ranks, step: int
) -> list[tuple[range, torch.Tensor, torch.Tensor]]:
    """This rank's `grad_accum` micro-batches of `step`: (rows, x0, eligible) each (`Batcher.get`).
    A step's rows are numbered over all data-parallel ranks, micro-batch by micro-batch, so any
    number of ranks reads the same global batch (and a resumed run the same rows)."""
    per_micro = cfg.batch_size * ranks.dp_world
    micro = []
    for m in range(cfg.grad_accum):
        first = m * per_micro + ranks.dp_rank * cfg.batch_size
        rows = range(first, first + cfg.batch_size)
        micro.append((rows, *batcher.get(step, rows)))
    return micro


def _eval_on_main(
    model: Transformer, tokenizer: Tokenizer, cfg: TrainConfig, held_out: TextSource, ranks: Ranks
) -> dict | None:
    """`quick_eval` on rank 0; a sharded model is first gathered into a plain copy there."""
    if ranks.mesh is None:
        return quick_eval(model, tokenizer, cfg, held_out)
    state = full_state_dict(model, ranks)
    report = None
    if ranks.is_main:
        with on_meta():
            plain = Transformer(model.config)
        plain.assign_weights(state, "cpu")
        report = quick_eval(plain.to(ranks.device), tokenizer, cfg, held_out)
    ranks.barrier()
    return report
