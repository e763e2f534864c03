"""SamplingParams: how one request decodes. Validates itself; errors name the field and allowed values."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum


class Mode(str, Enum):
    AR = "ar"
    DIFFUSION = "diffusion"
    SELFSPEC = "selfspec"


MODES = tuple(m.value for m in Mode)

# Temperatures below this sample as greedy: dividing logits by ~1e-38 overflows float32 to inf and
# the softmax to NaN, and anything this cold is argmax in effect (vLLM uses the same 1e-5 cut-off).
GREEDY_TEMPERATURE = 1e-5
# What torch.Generator.manual_seed accepts; top_k is a torch.long, and no vocabulary comes near 2**31.
SEED_RANGE = (-(2**63), 2**64 - 1)
MAX_TOP_K = 2**31 - 1
MAX_LOGPROBS = 20  # most likely tokens reported per position, as OpenAI's top_logprobs allows


@dataclass
class SamplingParams:
    mode: Mode | str = Mode.AR
    max_tokens: int = 128
    temperature: float = 0.0  # 0 (or below GREEDY_TEMPERATURE) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list[str] | str | None = field(default=None)
    ignore_eos: bool = False
    block_length: int = 32  # diffusion block / self-spec draft length, seed position included
    # diffusion: also reveal every masked position at least this confident; None = one per pass
    threshold: float | None = 0.9
    # Log-probabilities (see README, "Logprobs"): None = off; k = each generated token's and the k
    # most likely at its position (0 <= k <= MAX_LOGPROBS). `prompt_logprobs`: the same for every
    # prompt token but the first, from one causal pass over the prompt (then max_tokens may be 0).
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.mode, str) and not isinstance(self.mode, Mode):
            if self.mode not in MODES:
                raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
            self.mode = Mode(self.mode)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(
                value is None or (_is_int(value) and 0 <= value <= MAX_LOGPROBS),
                name,
                f"None or an integer in [0, {MAX_LOGPROBS}]",
                value,
            )
        least = 0 if self.prompt_logprobs is not None else 1  # scoring a prompt needs no new token
        _check(
            _is_int(self.max_tokens) and self.max_tokens >= least,
            "max_tokens",
            f"an integer >= {least}" + (" (0 only with prompt_logprobs)" if least else ""),
            self.max_tokens,
        )
        _check(
            _is_number(self.temperature) and self.temperature >= 0,
            "temperature",
            "a number >= 0 (0 = greedy)",
            self.temperature,
        )
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        _check(
            _is_int(self.top_k) and 0 <= self.top_k <= MAX_TOP_K,
            "top_k",
            f"an integer in [0, {MAX_TOP_K}] (0 = off)",
            self.top_k,
        )
        _check(
            self.seed is None or (_is_int(self.seed) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]),
            "seed",
            f"None or an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]",
            self.seed,
        )
        _check(
            isinstance(self.block_length, int) and self.block_length >= 1,
            "block_length",
            "an integer >= 1",
            self.block_length,
        )
        _check(
            self.threshold is None or (_is_number(self.threshold) and 0 <= self.threshold <= 1),
            "threshold",
            "None (one position per pass) or a number in [0, 1]",
            self.threshold,
        )
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings", self.stop)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(ok: bool, name: str, allowed: str, value: object) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name} must be {allowed}; got {value!r}")
