"""What several commands share: how a model is loaded (its flags and `load_llm`), model shapes,
and parsers of list-valued flags that fail with one line naming the flag."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from trimode.engine_args import EngineArgs
from trimode.sampling_params import REQUEST_MODES, SPECS, SamplingParams, Spec

if TYPE_CHECKING:
    from trimode.llm import LLM


def sampling_default(name: str) -> Any:
    """SamplingParams' default for the field `name`: the one place a mode's knobs default."""
    return SamplingParams.__dataclass_fields__[name].default


def add_mode_flags(p: argparse.ArgumentParser) -> None:
    """--block-length, --spec and --threshold: the knobs of the block modes, with SamplingParams'
    defaults."""
    block, spec, reveal = (sampling_default(n) for n in ("block_length", "spec", "threshold"))
    p.add_argument(
        "--block-length", type=int, default=block, help=f"block length of diffusion and selfspec (default {block})"
    )
    p.add_argument(
        "--spec",
        default=Spec(spec).value,
        help="selfspec: linear (a draft pass and a verify pass per cycle; the default) or quadratic (one pass "
        "of b(b+1) tokens per row verifies and drafts)",
    )
    p.add_argument(
        "--threshold",
        type=threshold,
        default=reveal,
        help=f"diffusion: reveal every position at least this confident (default {reveal}); 'none': one per pass",
    )


def mode_knobs(args: argparse.Namespace) -> dict[str, Any]:
    """What `add_mode_flags` read, as SamplingParams' keywords."""
    return {"block_length": args.block_length, "spec": args.spec, "threshold": args.threshold}


def load_llm(args: argparse.Namespace) -> LLM:
    """The model of a command's `add_model_flags`."""
    return EngineArgs.from_cli_args(args).create_llm()


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """--model, --dtype, --device, --tensor-parallel-size, --compile / --enforce-eager, ...: how
    every command that runs a model loads it (`EngineArgs`'s flags)."""
    EngineArgs.add_cli_args(p)


def add_model_shape_flags(p: argparse.ArgumentParser, preset_required: bool) -> None:
    p.add_argument(
        "--preset",
        required=preset_required,
        default=None if preset_required else "tiny",
        help="nld-3b, nld-8b, nld-14b or tiny",
    )
    shape = {
        "--layers": "decoder layers",
        "--hidden": "hidden size",
        "--vocab": "vocabulary size",
        "--intermediate": "MLP intermediate size",
        "--heads": "attention heads",
        "--kv-heads": "key/value heads (GQA)",
        "--head-dim": "dimension of each head",
    }
    for flag, what in shape.items():
        p.add_argument(flag, type=int, help=f"{what} (default: the preset's)")


def model_config_from_args(args: argparse.Namespace, vocab: int | None):
    from trimode.checkpoint import preset_config

    overrides = {
        k: v
        for k, v in (
            ("intermediate_size", args.intermediate),
            ("head_dim", args.head_dim),
            ("num_attention_heads", args.heads),
            ("num_key_value_heads", args.kv_heads),
        )
        if v is not None
    }
    return preset_config(args.preset, layers=args.layers, hidden=args.hidden, vocab=args.vocab or vocab, **overrides)


def int_list(flag: str, text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"{flag} must be comma-separated integers; got {text!r}") from e
    if not values or min(values) < 1:
        raise ValueError(f"{flag} must list integers >= 1; got {text!r}")
    return values


def float_list(flag: str, text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"{flag} must be comma-separated numbers; got {text!r}") from e
    if not values or not all(0 <= v <= 1 for v in values):
        raise ValueError(f"{flag} must list numbers in [0, 1]; got {text!r}")
    return values


def spec_list(text: str) -> list[str]:
    specs = [s.strip() for s in text.split(",") if s.strip()]
    if not specs or any(s not in SPECS for s in specs):
        raise ValueError(f"--spec must list some of {', '.join(SPECS)}; got {text!r}")
    return specs


def mode_list(text: str, allowed: Sequence[str] = REQUEST_MODES) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if not modes or any(m not in allowed for m in modes):
        raise ValueError(f"--modes must list some of {', '.join(allowed)}; got {text!r}")
    return modes


def dtype_sweep(flag: str) -> list[str]:
    """`--dtype float32,bfloat16` (the bench): the dtypes to sweep; [] for a single dtype."""
    from trimode.config import DTYPES

    if "," not in flag:
        return []
    dtypes = flag.split(",")
    if len(set(dtypes)) != len(dtypes) or not set(dtypes) <= DTYPES.keys():
        raise ValueError(f"--dtype lists distinct dtypes to sweep, of {', '.join(DTYPES)}; got {flag!r}")
    return dtypes


def threshold(text: str) -> float | None:
    """A --threshold value: a number, or `none` for one position per pass."""
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1] or 'none'; got {text!r}") from e


def structured_flag(value: str | None) -> str | None:
    """--structured: SamplingParams.structured as JSON, checked here (bad input is one line, exit 2)."""
    if value is None:
        return None
    from trimode.structured import check_spec

    try:
        check_spec(json.loads(value))
    except json.JSONDecodeError as e:
        raise ValueError(f'--structured must be JSON such as \'{{"regex": "[0-9 ]+"}}\'; got {value!r}: {e}') from e
    return value
