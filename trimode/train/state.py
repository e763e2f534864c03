"""Training checkpoints: an NLD checkpoint directory plus the trainer's state, written atomically.

Layout: OUT/checkpoint-000500/ holds config.json, model.safetensors (consolidated, in the release's
tensor names: `LLM(path)` loads it), the tokenizer files, training_args.json, trainer_state.json and
trainer/, the model and AdamW state as a distributed checkpoint (torch.distributed.checkpoint):
each rank writes its own shards as safetensors with their offsets (DCP's Hugging Face storage, no
pickle anywhere), and a run with another number of ranks, or one plain process, reads back the
slices it holds. Every rank writes into a temporary directory; once all have, rank 0 renames it
into place and replaces OUT/latest, which names the newest complete one. A run killed at any moment
leaves the previous `latest` intact. The data position and the masking noise are functions of
(seed, step, row), so the step is their state.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from trimode.config import DTYPES, ModelConfig
from trimode.model.transformer import Transformer
from trimode.train.parallel import Ranks

LATEST = "latest"
TRAINER_DIR = "trainer"


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def full_state_dict(model: torch.nn.Module, ranks: Ranks) -> dict[str, torch.Tensor]:
    """The whole model's tensors on the CPU, on rank 0 (empty elsewhere); every rank must call it."""
    if ranks.mesh is None:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return cast(dict[str, torch.Tensor], state)  # a model's state: tensors only


def save_model_dir(
    state: dict[str, torch.Tensor], config: ModelConfig, tokenizer_dir: Path, out: Path, dtype: str = "float32"
) -> None:
    """The NLD checkpoint part: loadable by `LLM(out)`."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = config.to_hf()
    cfg["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_id)}, indent=2)
    )
    tensors = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in state.items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, out / name)


def _states(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """The model's and the optimizer's state dicts, and their tensors flat by fully qualified name
    (the same tensors). The optimizer's state is created if it has not stepped yet, so a fresh run
    has the shapes to load into."""
    model_state, optim_state = get_state_dict(model, optimizer)
    flat = {f"model.{k}": cast(torch.Tensor, v) for k, v in model_state.items()}
    per_param = cast(dict[str, dict[str, Any]], optim_state["state"])
    for name, entries in per_param.items():
        flat.update({f"optim.{name}.{key}": v for key, v in entries.items() if torch.is_tensor(v)})
    return dict(model_state), dict(optim_state), flat


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: Transformer,
    tokenizer_dir: Path,
    optimizer: torch.optim.Optimizer,
    args: dict[str, Any],
    save_dtype: str,
    keep: int,
    ranks: Ranks,
) -> Path:
    """Every rank calls this; returns the checkpoint's final path."""
    tmp = out_dir / f".tmp-checkpoint-{step}"
    final = out_dir / f"checkpoint-{step:06d}"
    if ranks.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    ranks.barrier()
    writer = HuggingFaceStorageWriter(str(tmp / TRAINER_DIR), save_distributed=ranks.mesh is not None)
    dcp.save(_states(model, optimizer)[2], storage_writer=writer, no_dist=ranks.mesh is None)
    state = full_state_dict(model, ranks)
    if ranks.is_main:
        save_model_dir(state, model.config, tokenizer_dir, tmp, save_dtype)
        (tmp / "training_args.json").write_text(json.dumps(args, indent=2, default=str))
        meta = {"step": step, "seed": args.get("seed"), "data_position": {"step": step}, "world_size": ranks.world}
        (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_text_atomic(out_dir / LATEST, final.name)
        for old in sorted(out_dir.glob("checkpoint-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    ranks.barrier()
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = out_dir / LATEST
    if not pointer.is_file():
        return None
    path = out_dir / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore the model and optimizer from checkpoint `path`, written on any number of ranks, into
    this run's layout; return the step to continue from. Every rank calls this."""
    if not (path / TRAINER_DIR).is_dir():
        raise ValueError(
            f"{path} has no {TRAINER_DIR}/ distributed checkpoint (written by trimode before it trained on "
            "several ranks?); start a new run, e.g. with --init from its model files"
        )
    model_state, optim_state, flat = _states(model, optimizer)
    dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(path / TRAINER_DIR)), no_dist=not dist.is_initialized())
    # DCP loads into the tensors in place where it can and replaces the dict's entry elsewhere.
    model_state = {k: flat[f"model.{k}"] for k in model_state}
    for name, entries in optim_state["state"].items():
        entries.update({key: flat[f"optim.{name}.{key}"] for key in entries if f"optim.{name}.{key}" in flat})
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    return int(json.loads((path / "trainer_state.json").read_text())["step"])
