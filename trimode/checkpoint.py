"""`trimode make-checkpoint`: random-weight checkpoints in the exact Nemotron-Labs-Diffusion layout.

Presets hold the released shapes (design doc section 2); flags shrink them. Tensors are generated
and written one shard at a time, so even the 14B preset needs only one shard of host memory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from trimode.config import DTYPES, ModelConfig
from trimode.model.loader import LORA_DIR, PEFT_PREFIX, WEIGHTS_FILE, WEIGHTS_INDEX
from trimode.model.transformer import Transformer, on_meta
from trimode.tokenizer import BOS, IM_END, MASK, PAD, SPECIAL_TOKEN_IDS
from trimode.tokenizer_build import build_tokenizer, write_tokenizer_files

PRESETS: dict[str, ModelConfig] = {
    "nld-3b": ModelConfig(hidden_size=3072, num_hidden_layers=26, intermediate_size=9216),
    "nld-8b": ModelConfig(hidden_size=4096, num_hidden_layers=34, intermediate_size=14336),
    "nld-14b": ModelConfig(hidden_size=5120, num_hidden_layers=40, intermediate_size=16384),
    "tiny": ModelConfig(
        vocab_size=1024,
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=192,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    ),
}


def preset_config(
    preset: str, layers: int | None = None, hidden: int | None = None, vocab: int | None = None, **overrides: object
) -> ModelConfig:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}; got {preset!r}")
    base = PRESETS[preset]
    changes: dict[str, Any] = dict(overrides)  # ModelConfig fields; the dataclass validates them
    if layers is not None:
        changes["num_hidden_layers"] = layers
    if hidden is not None:
        changes["hidden_size"] = hidden
        # Keep the preset's MLP expansion ratio, rounded to a multiple of 16.
        changes.setdefault(
            "intermediate_size", max(16, round(base.intermediate_size / base.hidden_size * hidden / 16) * 16)
        )
    if vocab is not None:
        changes["vocab_size"] = vocab
    return dataclasses.replace(base, **changes)


def _random_tensor(name: str, shape: torch.Size, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    if name.endswith("norm.weight"):
        # Not all ones, so a norm weight that fails to load shows up in parity tests.
        return (1 + 0.1 * torch.randn(shape, generator=gen)).to(dtype)
    return (0.02 * torch.randn(shape, generator=gen)).to(dtype)


def _write_sharded(
    specs: dict[str, torch.Size], out: Path, gen: torch.Generator, dtype: torch.dtype, shard_bytes: int
) -> None:
    """Write tensors in `specs` order, a new shard whenever the current one would exceed shard_bytes."""
    item = torch.empty((), dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in specs.items():
        nbytes = math.prod(shape) * item
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    names = (
        [WEIGHTS_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for file, shard in zip(names, shards):
        tensors = {n: _random_tensor(n, specs[n], gen, dtype) for n in shard}
        save_file(tensors, out / file, metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(math.prod(s) * item for s in specs.values())
        index = {
            "metadata": {"total_size": total},
            "weight_map": {n: f for f, shard in zip(names, shards) for n in shard},
        }
        (out / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2))


def make_checkpoint(
    cfg: ModelConfig,
    out: str | Path,
    seed: int = 0,
    dtype: str = "bfloat16",
    draft_lora_rank: int = 0,
    shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write config, weights (sharded past shard_bytes), tokenizer, and optionally a draft LoRA."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    if draft_lora_rank < 0:
        raise ValueError(f"draft LoRA rank must be >= 0 (0 = no LoRA); got {draft_lora_rank}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(
        cfg,
        eos_token_id=(SPECIAL_TOKEN_IDS[IM_END],),
        bos_token_id=SPECIAL_TOKEN_IDS[BOS],
        mask_token_id=SPECIAL_TOKEN_IDS[MASK],
        pad_token_id=SPECIAL_TOKEN_IDS[PAD],
        torch_dtype=dtype,
    )
    (out / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
    (out / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": cfg.bos_token_id,
                "eos_token_id": [cfg.eos_token_id[0], SPECIAL_TOKEN_IDS["</s>"]],
                "pad_token_id": cfg.pad_token_id,
            },
            indent=2,
        )
    )
    with on_meta():
        specs = {k: v.shape for k, v in Transformer(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    _write_sharded(specs, out, gen, DTYPES[dtype], shard_bytes)
    if draft_lora_rank:
        _write_draft_lora(cfg, out / LORA_DIR, draft_lora_rank, gen, DTYPES[dtype])
    write_tokenizer_files(build_tokenizer(cfg.vocab_size), out, cfg.max_position_embeddings)
    return out


def _write_draft_lora(cfg: ModelConfig, out: Path, rank: int, gen: torch.Generator, dtype: torch.dtype) -> None:
    """PEFT layout; alpha = 4 * rank as in the release (rank 128, alpha 512)."""
    out.mkdir(parents=True, exist_ok=True)
    q_width = cfg.num_attention_heads * cfg.head_dim
    tensors = {}
    for i in range(cfg.num_hidden_layers):
        name = f"{PEFT_PREFIX}encoder.layers.{i}.self_attn.o_proj"
        tensors[f"{name}.lora_A.weight"] = _random_tensor("lora_A", torch.Size((rank, q_width)), gen, dtype)
        tensors[f"{name}.lora_B.weight"] = _random_tensor("lora_B", torch.Size((cfg.hidden_size, rank)), gen, dtype)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    adapter = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 4 * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": ["o_proj"],
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": os.fspath(out.parent),
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter, indent=2))
