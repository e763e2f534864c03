"""SamplingParams: how one request decodes. Validates itself; errors name the field and allowed values."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from trimode.structured import check_spec


class Mode(str, Enum):
    AR = "ar"
    DIFFUSION = "diffusion"
    SELFSPEC = "selfspec"
    # The engine picks, per row and cycle, the exact decoding (AR, linear or quadratic self-spec,
    # and their block lengths) with the most expected tokens per second for the load.
    AUTO = "auto"


MODES = ("ar", "diffusion", "selfspec")  # the decoding modes
REQUEST_MODES = (*MODES, "auto")  # what a request may ask for


class Spec(str, Enum):
    """How self-speculation drafts: `linear`, a draft pass then a verify pass per cycle; `quadratic`,
    one pass that verifies and drafts for every acceptance length (b(b+1) tokens per row)."""

    LINEAR = "linear"
    QUADRATIC = "quadratic"


SPECS = tuple(s.value for s in Spec)

# Temperatures below this sample as greedy: dividing logits by ~1e-38 overflows float32 to inf and
# the softmax to NaN, and anything this cold is argmax in effect (vLLM uses the same 1e-5 cut-off).
GREEDY_TEMPERATURE = 1e-5
# What torch.Generator.manual_seed accepts; top_k is a torch.long, and no vocabulary comes near 2**31.
SEED_RANGE = (-(2**63), 2**64 - 1)
MAX_TOP_K = 2**31 - 1
MAX_N = 64  # samples per prompt
MAX_LOGPROBS = 20  # most likely tokens reported per position, as OpenAI's top_logprobs allows


@dataclass
class SamplingParams:
    mode: Mode | str = Mode.AR
    max_tokens: int = 128
    # vLLM's default, so copied code samples alike; 0 (or below GREEDY_TEMPERATURE) is greedy.
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list[str] | str | None = field(default=None)
    ignore_eos: bool = False
    block_length: int = 32  # diffusion block / self-spec draft length, seed position included
    spec: Spec | str = Spec.LINEAR  # self-spec only: linear or quadratic (see `Spec`)
    # diffusion: also reveal every masked position at least this confident; None = one per pass
    threshold: float | None = 0.9
    # mode auto: may also pick diffusion (block 16 or 32, at `threshold`), which is faster where it
    # reveals several tokens a pass but does not give AR's tokens. Once diffusion, a row stays so.
    auto_lossy: bool = False
    # Log-probabilities (see README, "Logprobs"): None = off; k = each generated token's and the k
    # most likely at its position (0 <= k <= MAX_LOGPROBS). `prompt_logprobs`: the same for every
    # prompt token but the first, from one causal pass over the prompt (then max_tokens may be 0).
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # Logit controls (trimode/logit_controls.py), in every mode. OpenAI's penalties subtract
    # `presence` once and `frequency` per occurrence of a token already generated; the repetition
    # penalty divides (multiplies, if negative) the logits of tokens in the prompt or output.
    n: int = 1  # samples of the prompt (LLM and the server run them as n requests sharing its pages)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    min_tokens: int = 0  # EOS and stop_token_ids cannot end a row before this many tokens
    min_p: float = 0.0  # sampling: drop tokens less likely than min_p x the most likely one's
    stop_token_ids: list[int] = field(default_factory=list)  # end a row like EOS does
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True  # in the text (token_ids keep them)
    # Structured output (trimode/structured.py): {"json": schema}, {"json_object": True},
    # {"regex": pattern}, {"choice": [strings]} or {"grammar": lark}; AR and self-spec.
    structured: dict | None = None

    def __post_init__(self) -> None:
        if isinstance(self.mode, str) and not isinstance(self.mode, Mode):
            if self.mode not in REQUEST_MODES:
                raise ValueError(f"mode must be one of {', '.join(REQUEST_MODES)}; got {self.mode!r}")
            self.mode = Mode(self.mode)
        if not isinstance(self.spec, Spec):
            _check(self.spec in SPECS, "spec", f"one of {', '.join(SPECS)}", self.spec)
            self.spec = Spec(self.spec)
        for name, (valid, allowed) in _RANGES.items():
            _check(valid(getattr(self, name)), name, allowed, getattr(self, name))
        least = 0 if self.prompt_logprobs is not None else 1  # scoring a prompt needs no new token
        _check(
            _is_int(self.max_tokens) and self.max_tokens >= least,
            "max_tokens",
            f"an integer >= {least}" + (" (0 only with prompt_logprobs)" if least else ""),
            self.max_tokens,
        )
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check(
            all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids",
            "token ids (integers >= 0)",
            self.stop_token_ids,
        )
        if self.structured is not None:
            check_spec(self.structured)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings", self.stop)
        # The rules a mode sets on the other fields are its decoder's (`Decoder.check`).
        from trimode.decoding import check_params

        check_params(self)

    def samples(self) -> list[SamplingParams]:
        """The n one-sample params of the n samples: seeds seed, seed + 1, ... when seeded, so the
        samples differ and each is reproducible."""
        return [
            dataclasses.replace(self, n=1, seed=None if self.seed is None else (self.seed + j) % 2**64)
            for j in range(self.n)
        ]

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_logit_controls(self) -> bool:
        """Whether any control that reads the tokens so far (or biases logits) is on."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1
            or self.logit_bias
            or self.min_tokens
        )


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _logit_bias(v: object) -> bool:
    return v is None or (
        isinstance(v, dict) and all(_is_int(k) and k >= 0 and _is_number(b) and -100 <= b <= 100 for k, b in v.items())
    )


_LOGPROBS = (
    lambda v: v is None or (_is_int(v) and 0 <= v <= MAX_LOGPROBS),
    f"None or an integer in [0, {MAX_LOGPROBS}]",
)
_PENALTY = (lambda v: _is_number(v) and -2 <= v <= 2, "a number in [-2, 2] (0 = off)")
# Each field's own range: (whether a value is in it, what the error says the field must be). Rules
# that tie fields together are the modes' (`Decoder.check`), and max_tokens' floor depends on
# prompt_logprobs (`SamplingParams.__post_init__`).
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "logprobs": _LOGPROBS,
    "prompt_logprobs": _LOGPROBS,
    "temperature": (lambda v: _is_number(v) and v >= 0, "a number >= 0 (0 = greedy)"),
    "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "in (0, 1]"),
    "top_k": (lambda v: _is_int(v) and 0 <= v <= MAX_TOP_K, f"an integer in [0, {MAX_TOP_K}] (0 = off)"),
    "seed": (
        lambda v: v is None or (_is_int(v) and SEED_RANGE[0] <= v <= SEED_RANGE[1]),
        f"None or an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]",
    ),
    "block_length": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "threshold": (
        lambda v: v is None or (_is_number(v) and 0 <= v <= 1),
        "None (one position per pass) or a number in [0, 1]",
    ),
    "n": (lambda v: _is_int(v) and 1 <= v <= MAX_N, f"an integer in [1, {MAX_N}]"),
    "presence_penalty": _PENALTY,
    "frequency_penalty": _PENALTY,
    "repetition_penalty": (lambda v: _is_number(v) and 0 < v <= 10, "a number in (0, 10] (1 = off)"),
    "min_p": (lambda v: _is_number(v) and 0 <= v <= 1, "in [0, 1] (0 = off)"),
    "min_tokens": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "logit_bias": (_logit_bias, "None or a dict of token id -> bias in [-100, 100]"),
    "auto_lossy": (lambda v: isinstance(v, bool), "True or False"),
}


def _check(ok: bool, name: str, allowed: str, value: object) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name} must be {allowed}; got {value!r}")
