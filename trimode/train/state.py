"""Training checkpoints: an NLD checkpoint directory plus the trainer's state, written atomically.

Layout: OUT/checkpoint-000500/ holds config.json, model.safetensors, the tokenizer files,
training_args.json, trainer_state.json and optimizer.safetensors (no pickle anywhere). A checkpoint is
written into a temporary directory and renamed into place; OUT/latest (also replaced atomically)
names the newest complete one. A run killed at any moment leaves the previous `latest` intact.
The data position and the masking RNG are functions of (seed, step), so the step is their state.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from trimode.config import DTYPES
from trimode.model.transformer import Transformer

LATEST = "latest"


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_model_dir(model: Transformer, tokenizer_dir: Path, out: Path, dtype: str = "float32") -> None:
    """The NLD checkpoint part: loadable by `LLM(out)`."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_hf()
    cfg["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps(
            {"bos_token_id": model.config.bos_token_id, "eos_token_id": list(model.config.eos_token_id)}, indent=2
        )
    )
    state = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, out / name)


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: Transformer,
    tokenizer_dir: Path,
    optimizer: torch.optim.Optimizer,
    args: dict[str, Any],
    save_dtype: str,
    keep: int,
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".tmp-checkpoint-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_dir(model, tokenizer_dir, tmp, save_dtype)
    (tmp / "training_args.json").write_text(json.dumps(args, indent=2, default=str))
    opt = optimizer.state_dict()
    tensors = {
        f"state.{i}.{k}": v.detach().cpu().contiguous()
        for i, st in opt["state"].items()
        for k, v in st.items()
        if torch.is_tensor(v)
    }
    save_file(tensors, tmp / "optimizer.safetensors")
    (tmp / "trainer_state.json").write_text(
        json.dumps(
            {
                "step": step,
                "seed": args.get("seed"),
                "data_position": {"step": step},
                "optimizer_param_groups": opt["param_groups"],
            },
            indent=2,
        )
    )
    final = out_dir / f"checkpoint-{step:06d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_text_atomic(out_dir / LATEST, final.name)
    for old in sorted(out_dir.glob("checkpoint-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = out_dir / LATEST
    if not pointer.is_file():
        return None
    path = out_dir / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_trainer_state(path: Path, optimizer: torch.optim.Optimizer) -> int:
    """Restore the optimizer from checkpoint `path`; return the step to continue from."""
    meta = json.loads((path / "trainer_state.json").read_text())
    flat = load_file(path / "optimizer.safetensors")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_param_groups"]})
    return int(meta["step"])
