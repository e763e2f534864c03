"""The three decoding modes (self-speculation linear or quadratic), and the exact decodings `auto`
chooses among; the only package that knows what a mode is."""

from __future__ import annotations

import dataclasses
import functools

from trimode.decoding.autoregressive import AutoregressiveDecoder
from trimode.decoding.base import Decoder
from trimode.decoding.diffusion import DiffusionDecoder
from trimode.decoding.quadratic import QuadraticSelfSpecDecoder
from trimode.decoding.selfspec import SelfSpecDecoder
from trimode.sampling_params import Mode, SamplingParams, Spec

# The SamplingParams fields each mode reads beyond the common ones, so callers that sweep or send
# them (the bench) need not know the modes themselves.
MODE_PARAMETERS: dict[str, tuple[str, ...]] = {
    Mode.AR.value: (),
    Mode.DIFFUSION.value: ("block_length", "threshold"),
    Mode.SELFSPEC.value: ("block_length", "spec"),
    Mode.AUTO.value: (),
}
# What `auto` chooses among: the exact decodings (AR's tokens at temperature 0, its distribution
# above), as (mode, block length, spec). Diffusion is lossy, so it is not one of them; a request
# with `auto_lossy` may also run LOSSY_DECODINGS (at its own threshold).
EXACT_DECODINGS: tuple[tuple[str, int, str], ...] = (
    ("ar", 1, "linear"),
    *(("selfspec", b, "linear") for b in (4, 8, 16, 32)),
    *(("selfspec", b, "quadratic") for b in (2, 4, 8)),
)
LOSSY_DECODINGS: tuple[tuple[str, int, str], ...] = tuple(("diffusion", b, "linear") for b in (16, 32))


def uses(mode: str, parameter: str) -> bool:
    """Whether `mode` reads SamplingParams.`parameter` (e.g. uses("selfspec", "threshold") is False)."""
    return parameter in MODE_PARAMETERS[mode]


def check_params(params: SamplingParams) -> None:
    """The rules each mode sets on a request's other fields (`Decoder.check`), as SamplingParams
    validates itself. An `auto_lossy` request may come to run diffusion, so it meets diffusion's."""
    if params.auto_lossy and params.mode != Mode.AUTO:
        mode = Mode(params.mode).value
        raise ValueError(f"auto_lossy lets mode auto pick diffusion too: give it with mode='auto'; got mode {mode!r}")
    if params.spec == Spec.QUADRATIC:
        QuadraticSelfSpecDecoder.check(params)
    if params.mode == Mode.DIFFUSION or params.auto_lossy:
        DiffusionDecoder.check(params)


def decoding(params: SamplingParams, choice: tuple[str, int, str]) -> SamplingParams:
    """`params` decoded as `choice`, one of EXACT_DECODINGS or LOSSY_DECODINGS (an `auto` request's
    current decoding)."""
    mode, block_length, spec = choice
    return dataclasses.replace(params, mode=mode, block_length=block_length, spec=spec, auto_lossy=False)


def choice_of(params: SamplingParams) -> tuple[str, int, str]:
    """The EXACT_DECODINGS (or LOSSY_DECODINGS) entry `params` decodes as."""
    if params.mode == Mode.AR:
        return EXACT_DECODINGS[0]
    return Mode(params.mode).value, params.block_length, Spec(params.spec).value


def decoding_name(params: SamplingParams) -> str:
    """A decoding's short name, as usage reports it: `ar`, `selfspec_b8`, `quadratic_b4`, `diffusion_b32`."""
    if params.mode == Mode.AR:
        return "ar"
    kind = "quadratic" if params.spec == Spec.QUADRATIC else Mode(params.mode).value
    return f"{kind}_b{params.block_length}"


def make_decoder(params: SamplingParams) -> Decoder:
    if params.mode == Mode.AUTO:
        raise ValueError("an auto request decodes as the decoding the engine chose (`decoding`)")
    if params.mode == Mode.AR:
        return AutoregressiveDecoder()
    if params.mode == Mode.DIFFUSION:
        return DiffusionDecoder(params.block_length, params.threshold)
    if params.spec == Spec.QUADRATIC:
        return QuadraticSelfSpecDecoder(params.block_length)
    return SelfSpecDecoder(params.block_length)


@functools.cache
def widest_exact_pass() -> int:
    """Tokens per row of the widest exact decoding's pass: what an auto row may come to feed."""
    return max(make_decoder(SamplingParams(mode=m, block_length=b, spec=s)).width for m, b, s in EXACT_DECODINGS)


def pass_width(params: SamplingParams) -> int:
    """Tokens one row of this request feeds per decode pass: what its KV scratch and the step's
    token budget must hold (quadratic self-spec: b(b+1))."""
    return make_decoder(params).width


def prefill_tail(params: SamplingParams) -> int:
    """Masks this request's prefill feeds after its context to draft its first block
    (`Decoder.prefill_tail`)."""
    return make_decoder(params).prefill_tail


def batch_key(params: SamplingParams) -> tuple:
    """Requests with equal keys can share one decode batch (same step shape)."""
    if params.mode == Mode.AR:
        return (params.mode,)
    if params.mode == Mode.DIFFUSION:
        return (params.mode, params.block_length, params.threshold)
    return (params.mode, params.block_length, params.spec)
