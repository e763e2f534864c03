"""The three decoding modes (self-speculation linear or quadratic); the only package that knows what a mode is."""

from __future__ import annotations

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
}


def uses(mode: str, parameter: str) -> bool:
    """Whether `mode` reads SamplingParams.`parameter` (e.g. uses("selfspec", "threshold") is False)."""
    return parameter in MODE_PARAMETERS[mode]


def make_decoder(params: SamplingParams) -> Decoder:
    if params.mode == Mode.AR:
        return AutoregressiveDecoder()
    if params.mode == Mode.DIFFUSION:
        return DiffusionDecoder(params.block_length, params.threshold)
    if params.spec == Spec.QUADRATIC:
        return QuadraticSelfSpecDecoder(params.block_length)
    return SelfSpecDecoder(params.block_length)


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
