"""SamplingParams: how one request decodes. Validates itself; errors name the field and allowed values."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum

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
        _check(_is_int(self.n) and 1 <= self.n <= MAX_N, "n", f"an integer in [1, {MAX_N}]", self.n)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_number(value) and -2 <= value <= 2, name, "a number in [-2, 2] (0 = off)", value)
        _check(
            _is_number(self.repetition_penalty) and 0 < self.repetition_penalty <= 10,
            "repetition_penalty",
            "a number in (0, 10] (1 = off)",
            self.repetition_penalty,
        )
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", "in [0, 1] (0 = off)", self.min_p)
        _check(_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", "an integer >= 0", self.min_tokens)
        _check(
            self.logit_bias is None
            or (
                isinstance(self.logit_bias, dict)
                and all(
                    _is_int(k) and k >= 0 and _is_number(v) and -100 <= v <= 100 for k, v in self.logit_bias.items()
                )
            ),
            "logit_bias",
            "None or a dict of token id -> bias in [-100, 100]",
            self.logit_bias,
        )
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check(
            all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids",
            "token ids (integers >= 0)",
            self.stop_token_ids,
        )
        _check(isinstance(self.auto_lossy, bool), "auto_lossy", "True or False", self.auto_lossy)
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


def _check(ok: bool, name: str, allowed: str, value: object) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name} must be {allowed}; got {value!r}")
