"""Checkpoint directory -> Transformer. Safetensors only (never pickle); errors name the file or tensor.

A checkpoint's tensor names equal our module names (`encoder.*`, `diffusion_head.weight`), so the
mapping is the identity; the draft LoRA's PEFT names map onto `self_attn.draft_lora.*`.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from trimode.config import ModelConfig
from trimode.model.tensor_parallel import TensorParallel, shard_model, shard_range
from trimode.model.transformer import Transformer, on_meta

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
LORA_DIR = "linear_spec_lora"
PEFT_PREFIX = "base_model.model."


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def load_config(path: str | Path) -> ModelConfig:
    if not Path(path).is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    cfg = read_json(Path(path) / "config.json")
    try:
        return ModelConfig.from_hf(cfg)
    except KeyError as e:
        raise ValueError(f"{Path(path) / 'config.json'} lacks the field {e}") from e


def _weight_files(path: Path) -> dict[str, Path]:
    """tensor name -> file holding it."""
    index = path / WEIGHTS_INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no `weight_map` object")
        return {name: path / file for name, file in weight_map.items()}
    single = path / WEIGHTS_FILE
    if not single.is_file():
        raise FileNotFoundError(
            f"{path} has neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX} (weights load only from safetensors)"
        )
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


# Safetensors dtype names of the floating tensors read straight into aligned memory.
FILE_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _read_tensors(
    files: dict[str, Path],
    wanted: dict[str, tuple[torch.Size, str]],
    dtype: torch.dtype,
    device: torch.device,
    cuts: dict[str, tuple[int, int, int]] | None = None,
) -> dict[str, torch.Tensor]:
    """Read `wanted` (our name -> (full shape, checkpoint name)) from `files` (checkpoint name ->
    file); a name in `cuts` reads only its (dim, start, length) slice, from disk."""
    by_file: dict[Path, list[str]] = {}
    for name, (_, ckpt_name) in wanted.items():
        if ckpt_name not in files:
            raise ValueError(f"tensor `{ckpt_name}` is missing from the checkpoint")
        by_file.setdefault(files[ckpt_name], []).append(name)
    out = {}
    for file, names in by_file.items():
        if not file.is_file():
            raise FileNotFoundError(f"{file} (named in the weight index) is missing")
        with safe_open(file, framework="pt") as f, file.open("rb") as raw:
            spans = _data_spans(raw) if device.type == "cpu" else {}
            for name in names:
                shape, ckpt_name = wanted[name]
                stored = f.get_slice(ckpt_name)
                if tuple(stored.get_shape()) != tuple(shape):
                    raise ValueError(
                        f"tensor `{ckpt_name}` in {file.name} has shape {tuple(stored.get_shape())}; "
                        f"config.json implies {tuple(shape)}"
                    )
                cut = (cuts or {}).get(name)
                if cut is None and ckpt_name in spans:
                    t = _read_aligned(raw, spans[ckpt_name], shape, ckpt_name)
                elif cut is None:
                    t = stored[:]
                else:
                    dim, start, length = cut
                    t = stored[(slice(None),) * dim + (slice(start, start + length),)]
                out[name] = t.to(device=device, dtype=dtype)
    return out


def _data_spans(raw: io.BufferedReader) -> dict[str, tuple[torch.dtype, int, int]]:
    """A safetensors file's floating tensors: name -> (dtype, first byte, end byte) in the file."""
    header_size = int.from_bytes(raw.read(8), "little")
    header = json.loads(raw.read(header_size))
    return {
        name: (
            FILE_DTYPES[entry["dtype"]],
            8 + header_size + entry["data_offsets"][0],
            8 + header_size + entry["data_offsets"][1],
        )
        for name, entry in header.items()
        if name != "__metadata__" and entry["dtype"] in FILE_DTYPES
    }


def _read_aligned(
    raw: io.BufferedReader, span: tuple[torch.dtype, int, int], shape: torch.Size, name: str
) -> torch.Tensor:
    """A tensor's bytes read from the file into a fresh CPU tensor. Safetensors aligns data to 8
    bytes, so a tensor used in place from the file's mapping starts mid cache line, and oneDNN's bf16
    matmuls streamed such weights ~6% slower (an nld-3b AR step, interleaved); a fresh tensor starts
    on one (torch aligns CPU allocations to 64 bytes). Reading, not copying from the mapping, keeps
    the peak at the weights' size: no file pages stay mapped beside them."""
    dtype, begin, end = span
    t = torch.empty(shape, dtype=dtype)
    raw.seek(begin)
    if raw.readinto(t.view(-1).view(torch.uint8).numpy().data) != end - begin:
        raise ValueError(f"tensor `{name}` is cut short in its file")
    return t


def _lora_settings(lora_dir: Path, cfg: ModelConfig) -> tuple[int, float]:
    adapter = read_json(lora_dir / "adapter_config.json")
    targets = adapter.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    if list(targets) != ["o_proj"]:
        raise ValueError(
            f"{lora_dir / 'adapter_config.json'}: target_modules must be ['o_proj'] (the draft "
            f"LoRA of the release); got {targets}"
        )
    rank, alpha = int(adapter["r"]), float(adapter.get("lora_alpha", adapter["r"]))
    if rank < 1:
        raise ValueError(f"{lora_dir / 'adapter_config.json'}: r must be >= 1; got {rank}")
    return rank, alpha / rank


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    load_draft_lora: bool = True,
    tp: TensorParallel | None = None,
) -> Transformer:
    """`tp`: load only this rank's tensor-parallel slices (`shard_model`), read from disk as slices."""
    path, device = Path(path), torch.device(device)
    cfg = load_config(path)
    with on_meta():  # no memory until the real tensors are assigned
        model = Transformer(cfg)
    lora_dir = path / LORA_DIR
    if load_draft_lora and lora_dir.is_dir():
        rank, scale = _lora_settings(lora_dir, cfg)
        with on_meta():
            model.attach_draft_lora(rank, scale)
    expected = {k: v.shape for k, v in model.state_dict().items()}  # full shapes: what the files hold
    cuts = {}
    if tp is not None:
        cuts = {k: c for k in expected if (c := shard_range(k, cfg, tp.rank, tp.world)) is not None}
        shard_model(model, cfg, tp)
    base = {k: (s, k) for k, s in expected.items() if ".draft_lora." not in k}
    files = _weight_files(path)
    unexpected = sorted(set(files) - set(base))
    if unexpected:
        warnings.warn(
            f"{path}: ignoring {len(unexpected)} tensors the model does not use, e.g. {unexpected[:3]}", stacklevel=2
        )
    tensors = _read_tensors(files, base, dtype, device, cuts)
    lora = {
        k: (s, PEFT_PREFIX + k.replace(".draft_lora.", ".o_proj.")) for k, s in expected.items() if ".draft_lora." in k
    }
    if lora:
        lora_file = lora_dir / "adapter_model.safetensors"
        if not lora_file.is_file():
            raise FileNotFoundError(f"{lora_file} is missing (adapter_config.json is present)")
        with safe_open(lora_file, framework="pt") as f:
            # PEFT may keep the adapter name (`lora_A.default.weight`); accept both spellings.
            lora_names = {n.replace(".default.", "."): n for n in f.keys()}
        tensors.update(
            _read_tensors(
                {n: lora_file for n in lora_names.values()},
                {k: (s, lora_names.get(c, c)) for k, (s, c) in lora.items()},
                dtype,
                device,
                cuts,
            )
        )
    model.assign_weights(tensors, device)
    return model.eval().requires_grad_(False)
