"""Where training starts: random weights, an NLD checkpoint, or a Hugging Face causal LM.

Converting a Mistral / Ministral-3 / Llama causal LM is a renaming (`model.*` -> `encoder.*`,
`lm_head` -> `diffusion_head`): the AR model is unchanged, and the joint objective then teaches the
same weights to denoise (Efficient-DLM's AR -> tri-mode conversion).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open

from trimode.config import ModelConfig
from trimode.model.loader import WEIGHTS_FILE, WEIGHTS_INDEX, load_model, read_json
from trimode.model.rope import RotaryEmbedding
from trimode.model.transformer import Transformer

HF_CAUSAL_TYPES = ("mistral", "ministral", "ministral3", "llama")


def random_model(cfg: ModelConfig, seed: int) -> Transformer:
    """GPT-2-style init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers)."""
    gen = torch.Generator().manual_seed(seed)
    model = Transformer(cfg)
    residual_std = 0.02 / math.sqrt(2 * cfg.num_hidden_layers)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        else:
            std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            torch.nn.init.normal_(p, std=std, generator=gen)
    return model


def hf_causal_config(cfg: dict, mask_token_id: int) -> ModelConfig:
    """A Mistral/Llama `config.json` as an NLD ModelConfig (plain RoPE unless it declares YaRN)."""
    text = cfg.get("text_config", cfg)
    nld = dict(text, model_type="nemotron_labs_diffusion", mask_token_id=mask_token_id)
    if text.get("tie_word_embeddings"):
        nld["tie_word_embeddings"] = False  # the head is copied from the embedding below
    return ModelConfig.from_hf(nld)


def _hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / WEIGHTS_INDEX
    files = sorted(set(read_json(index)["weight_map"].values())) if index.is_file() else [WEIGHTS_FILE]
    out = {}
    for name in files:
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is missing (weights load only from safetensors)")
        with safe_open(path / name, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open is not a dict)
    return out


def load_hf_causal_lm(path: str | Path, mask_token_id: int) -> Transformer:
    path = Path(path)
    cfg = read_json(path / "config.json")
    model_type = cfg.get("model_type")
    if model_type not in HF_CAUSAL_TYPES:
        raise ValueError(
            f"{path / 'config.json'}: model_type {model_type!r} cannot be converted; supported: "
            f"nemotron_labs_diffusion, {', '.join(HF_CAUSAL_TYPES)}"
        )
    nld_cfg = hf_causal_config(cfg, mask_token_id)
    model = Transformer(nld_cfg)
    tensors = _hf_tensors(path)
    prefix = "language_model.model." if any(k.startswith("language_model.") for k in tensors) else "model."
    renamed = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    state = {"encoder." + k: v for k, v in renamed.items() if not k.startswith("rotary_emb")}
    head = tensors.get("lm_head.weight", tensors.get("language_model.lm_head.weight"))
    state["diffusion_head.weight"] = head if head is not None else state["encoder.embed_tokens.weight"].clone()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: cannot map onto the NLD layout: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.rotary = RotaryEmbedding(nld_cfg.rope, nld_cfg.head_dim)
    return model.float()


def initial_model(init: str | None, cfg: ModelConfig | None, seed: int, mask_token_id: int) -> Transformer:
    if init is None:
        if cfg is None:
            raise ValueError("training from scratch needs a model config (--preset and size flags) or --init PATH")
        return random_model(cfg, seed)
    model_type = read_json(Path(init) / "config.json").get("model_type")
    if model_type == "nemotron_labs_diffusion":
        return load_model(init, torch.float32, "cpu", load_draft_lora=False).requires_grad_(True)
    return load_hf_causal_lm(init, mask_token_id)
