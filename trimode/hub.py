"""Checkpoints by name: a local directory as it is, or a Hugging Face hub id
(`nvidia/Nemotron-Labs-Diffusion-8B`) resolved as vLLM resolves one, through huggingface_hub:
the shared cache, `revision`, `HF_HUB_OFFLINE`, `HF_TOKEN`. Only the files the loader reads are
fetched: the config, tokenizer, safetensors weights and the draft LoRA, never a pickle."""

from __future__ import annotations

import re
from pathlib import Path

# What the loader and tokenizer read from a checkpoint directory.
HUB_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "linear_spec_lora/*.json",
    "linear_spec_lora/*.safetensors",
]
# A hub id: one owner, one name (huggingface_hub's rules for their characters).
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def is_hub_id(model: str | Path) -> bool:
    """Whether `model` names a hub repository rather than a local directory."""
    return isinstance(model, str) and not Path(model).exists() and HUB_ID.fullmatch(model) is not None


def resolve_model(model: str | Path, revision: str | None = None) -> Path:
    """The directory of `model`: itself, or a hub id's snapshot in the Hugging Face cache
    (downloaded there first unless offline). `revision` (a branch, tag or commit) is for hub ids."""
    if not is_hub_id(model):
        if revision is not None:
            raise ValueError(f"revision {revision!r} is for Hugging Face hub ids; {model!r} is a local path")
        return Path(model)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {revision!r}" if revision else ""
    try:
        return Path(snapshot_download(str(model), revision=revision, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{model!r} is not a local directory, and the Hugging Face cache has no copy of it{at} while "
            "offline (HF_HUB_OFFLINE, or the hub unreachable): download it once online, or pass a checkpoint directory"
        ) from None
    except GatedRepoError:
        raise FileNotFoundError(
            f"{model!r} is gated on the Hugging Face hub: accept its terms there and set HF_TOKEN"
        ) from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{model!r} has no revision {revision!r} on the Hugging Face hub") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{model!r} is neither a local directory nor a Hugging Face hub repository you can read "
            "(a private one needs HF_TOKEN)"
        ) from None
