"""Model configuration parsed from a Hugging Face `config.json`, and the engine's sizes (`EngineConfig`),
validated at construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from trimode.kv_cache import PAGE_SIZE

SUPPORTED_MODEL_TYPES = ("nemotron_labs_diffusion",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# The release's remote code (files shipped in NVIDIA's checkpoint repositories).
AUTO_MAP = {
    "AutoConfig": "configuration_nemotron_labs_diffusion.NemotronLabsDiffusionConfig",
    "AutoModel": "modeling_nemotron_labs_diffusion.NemotronLabsDiffusionModel",
}


def _require(ok: bool, name: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"config field `{name}` must be {allowed}; got {value!r}")


@dataclass(frozen=True)
class RopeConfig:
    """RoPE with optional YaRN blending and Llama-4 query scaling (design doc section 3)."""

    rope_type: str = "yarn"
    rope_theta: float = 1e6
    factor: float = 16.0
    original_max_position_embeddings: int = 16384
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    llama_4_scaling_beta: float = 0.1

    def __post_init__(self) -> None:
        _require(
            self.rope_type in ("yarn", "default"), "rope_parameters.rope_type", "'yarn' or 'default'", self.rope_type
        )
        _require(self.rope_theta > 0, "rope_parameters.rope_theta", "> 0", self.rope_theta)
        _require(self.factor >= 1, "rope_parameters.factor", ">= 1", self.factor)
        _require(
            self.original_max_position_embeddings > 0,
            "rope_parameters.original_max_position_embeddings",
            "> 0",
            self.original_max_position_embeddings,
        )

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> RopeConfig:
        """Accept the current `rope_parameters` and the older `rope_scaling` + `rope_theta` layouts."""
        params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        if "rope_theta" not in params and "rope_theta" in cfg:
            params["rope_theta"] = cfg["rope_theta"]
        params["rope_type"] = params.get("rope_type", params.get("type", "default"))
        if params["rope_type"] == "default":
            # Plain RoPE: no interpolation and no query scaling.
            params.setdefault("factor", 1.0)
            params.setdefault("llama_4_scaling_beta", 0.0)
            params.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings", 16384))
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})

    def to_hf(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModelConfig:
    """The fields of a Nemotron-Labs-Diffusion `config.json` that the engine uses."""

    vocab_size: int = 131072
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 34
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 262144
    bos_token_id: int = 1
    eos_token_id: tuple[int, ...] = (11,)
    pad_token_id: int | None = None
    mask_token_id: int = 100
    block_size: int = 32
    rope: RopeConfig = field(default_factory=RopeConfig)
    model_type: str = "nemotron_labs_diffusion"
    torch_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        _require(
            self.model_type in SUPPORTED_MODEL_TYPES, "model_type", f"one of {SUPPORTED_MODEL_TYPES}", self.model_type
        )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "block_size",
        ):
            _require(getattr(self, name) >= 1, name, ">= 1", getattr(self, name))
        _require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "num_key_value_heads",
            f"a divisor of num_attention_heads={self.num_attention_heads}",
            self.num_key_value_heads,
        )
        _require(self.head_dim % 2 == 0, "head_dim", "even (RoPE rotates pairs)", self.head_dim)
        for name in ("bos_token_id", "mask_token_id"):
            _require(
                0 <= getattr(self, name) < self.vocab_size, name, f"in [0, {self.vocab_size})", getattr(self, name)
            )
        _require(
            len(self.eos_token_id) > 0 and all(0 <= t < self.vocab_size for t in self.eos_token_id),
            "eos_token_id",
            f"one or more ids in [0, {self.vocab_size})",
            self.eos_token_id,
        )

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        eos = cfg.get("eos_token_id", 11)
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        hidden_act = cfg.get("hidden_act", "silu")
        _require(hidden_act == "silu", "hidden_act", "'silu'", hidden_act)
        _require(
            not cfg.get("tie_word_embeddings", False),
            "tie_word_embeddings",
            "false (the diffusion_head is untied)",
            cfg.get("tie_word_embeddings"),
        )
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            max_position_embeddings=cfg.get("max_position_embeddings", 262144),
            bos_token_id=cfg.get("bos_token_id", 1),
            eos_token_id=tuple(eos) if isinstance(eos, list) else (eos,),
            pad_token_id=cfg.get("pad_token_id"),
            mask_token_id=cfg.get("mask_token_id", 100),
            block_size=cfg.get("block_size", 32),
            rope=RopeConfig.from_hf(cfg),
            model_type=cfg.get("model_type", "<missing>"),
            torch_dtype=cfg.get("torch_dtype", cfg.get("dtype", "bfloat16")),
        )

    def to_hf(self) -> dict[str, Any]:
        """The `config.json` of the real release, field for field. `auto_map` names the release's
        remote code, so `AutoModel.from_pretrained(dir, trust_remote_code=True)` finds it once its
        .py files are in the directory; vLLM and SGLang select their model by `architectures`."""
        return {
            "architectures": ["NemotronLabsDiffusionModel"],
            "auto_map": AUTO_MAP,
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": False,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "attn_implementation": "sdpa",
            "mlp_bias": False,
            "sliding_window": None,
            "initializer_range": 0.02,
            "use_cache": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id),
            "pad_token_id": self.pad_token_id,
            "mask_token_id": self.mask_token_id,
            "block_size": self.block_size,
            "dlm_paradigm": "bidirectional",
            "dlm_loss_weight": None,
            "dp_varying_mask_ratio": False,
            "rope_parameters": self.rope.to_hf(),
            "torch_dtype": self.torch_dtype,
        }

    @property
    def num_parameters(self) -> int:
        h, q = self.hidden_size, self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        layer = h * q * 2 + h * kv * 2 + 3 * h * self.intermediate_size + 2 * h
        return self.num_hidden_layers * layer + 2 * self.vocab_size * h + h


DEFAULT_BATCHED_TOKENS = 512  # prompt tokens per prefill step, and tokens per decode pass


def flag(text: str, *flags: str, type_: type | None = None, name: str | None = None) -> dict[str, Any]:
    """A field's command-line flag: its help, other spellings, its type where the default (None)
    does not say it, and its name where it is not the field's (`--kv-page-size` for page_size)."""
    return {"help": text, "flags": flags, "type": type_, "name": name}


@dataclass(frozen=True)
class EngineConfig:
    """How big an engine is; all of its memory (the KV pool) is allocated when it starts."""

    max_batch: int = field(default=32, metadata=flag("requests decoding at once"))
    max_queue: int = field(default=256, metadata=flag("requests waiting; more are refused with 429"))
    kv_cache_tokens: int = field(
        default=65536,
        metadata=flag(
            "KV slots in the pool shared by all requests, allocated at start (its bytes are printed)",
            "--max-kv-tokens",
        ),
    )
    page_size: int = field(default=PAGE_SIZE, metadata=flag("KV slots per page of the pool", name="--kv-page-size"))
    max_num_batched_tokens: int = field(
        default=DEFAULT_BATCHED_TOKENS,
        metadata=flag("prompt tokens one prefill step feeds; longer prompts are prefilled in chunks of this many"),
    )
    # The tokens one decode pass of a group may feed (rows x pass width; a group holds that many
    # rows): by default max_num_batched_tokens. Offline generation sizes it to the call.
    max_decode_tokens: int | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{f.name} must be an integer >= 1; got {value!r}")

    @property
    def decode_tokens(self) -> int:
        return self.max_decode_tokens or self.max_num_batched_tokens
