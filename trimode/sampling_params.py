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


@dataclass
class SamplingParams:
    mode: Mode | str = Mode.AR
    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list[str] | str | None = field(default=None)
    ignore_eos: bool = False
    block_length: int = 32  # diffusion block / self-spec draft length, seed position included
    threshold: float = 0.9  # diffusion: also reveal every masked position more confident than this

    def __post_init__(self) -> None:
        if isinstance(self.mode, str) and not isinstance(self.mode, Mode):
            if self.mode not in MODES:
                raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
            self.mode = Mode(self.mode)
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", "an integer >= 1",
               self.max_tokens)
        _check(_is_number(self.temperature) and self.temperature >= 0, "temperature", "a number >= 0 (0 = greedy)",
               self.temperature)
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "an integer >= 0 (0 = off)", self.top_k)
        _check(self.seed is None or isinstance(self.seed, int), "seed", "an integer or None", self.seed)
        _check(isinstance(self.block_length, int) and self.block_length >= 1, "block_length", "an integer >= 1",
               self.block_length)
        _check(_is_number(self.threshold) and 0 <= self.threshold <= 1, "threshold", "in [0, 1]", self.threshold)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings", self.stop)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(ok: bool, name: str, allowed: str, value: object) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name} must be {allowed}; got {value!r}")
