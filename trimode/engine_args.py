"""How a model is loaded and how big the engine over it is: `EngineArgs` (vLLM's name), read by
`trimode serve`, `generate`, `chat`, `bench` and `eval`, whose flags are generated from its fields,
so a flag, its default and its help are written once."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from trimode.config import EngineConfig, flag

if TYPE_CHECKING:
    from trimode.engine.llm_engine import LLMEngine
    from trimode.llm import LLM


@dataclass(frozen=True)
class EngineArgs:
    """Which model, loaded how (`LLM`'s arguments), and the engine's sizes where a command serves."""

    model: str | None = field(
        default=None, metadata=flag("checkpoint directory or Hugging Face hub id (default: the embedded model)")
    )
    revision: str | None = field(default=None, metadata=flag("the hub id's branch, tag or commit (default: main)"))
    dtype: str = field(default="auto", metadata=flag("auto, float32, bfloat16 or float16"))
    device: str = field(default="auto", metadata=flag("auto, cpu or cuda"))
    tensor_parallel_size: int = field(
        default=1,
        metadata=flag(
            "split the weights and KV heads over N processes: under torchrun, the N it launched; otherwise "
            "N - 1 workers this command spawns (GPUs 0..N-1, or the CPU)",
            "-tp",
        ),
    )
    # "auto": on a CPU, forwards whose compiled program is in the cache run it, the rest eager; on a
    # GPU, decode passes run as CUDA graphs. True compiles what is missing; False is eager.
    compile: str | bool = "auto"
    max_model_len: int | None = field(
        default=None,
        metadata=flag("longest prompt + max_tokens a request may ask for (default: the model's)", type_=int),
    )
    engine: EngineConfig = EngineConfig()

    def __post_init__(self) -> None:
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1; got {self.max_model_len}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1; got {self.tensor_parallel_size}")

    def create_llm(self) -> LLM:
        from trimode.llm import LLM

        return LLM(
            model=self.model,
            revision=self.revision,
            dtype=self.dtype,
            device=self.device,
            compile=self.compile,
            tensor_parallel_size=self.tensor_parallel_size,
            max_model_len=self.max_model_len,
        )

    def create_engine(self, llm: LLM) -> LLMEngine:
        return llm.engine(self.engine)

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser, serving: bool = False) -> None:
        """The flags of every field (with `serving`, the engine's sizes too): `--max-model-len`
        for `max_model_len`, and so on; `--compile` / `--enforce-eager` for `compile`."""
        for f in dataclasses.fields(EngineArgs):
            if f.metadata:
                _add_flag(parser, f)
        speed = parser.add_mutually_exclusive_group()
        speed.add_argument(
            "--compile",
            action="store_const",
            const=True,
            default="auto",
            help="CPU: load every compiled forward program at start-up, compiling those not yet cached (about a "
            "minute each on 2 cores, once: later runs load them by default). GPU: CUDA graphs, as by default",
        )
        speed.add_argument(
            "--enforce-eager",
            dest="compile",
            action="store_const",
            const=False,
            help="never run compiled programs or CUDA graphs",
        )
        if serving:
            for f in dataclasses.fields(EngineConfig):
                if f.metadata:
                    _add_flag(parser, f)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        """The args a parser given `add_cli_args` read (engine sizes at their defaults where the
        command has no such flags)."""
        flagged = [
            f for c in (cls, EngineConfig) for f in dataclasses.fields(c) if f.metadata and hasattr(args, f.name)
        ]
        for f in flagged:  # named by flag here, by field in the dataclasses
            value = getattr(args, f.name)
            if isinstance(value, int) and value < 1:
                raise ValueError(f"{_flag_name(f)} must be > 0; got {value}")
        sizes = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig) if hasattr(args, f.name)}
        own = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name != "engine"}
        return cls(**own, engine=EngineConfig(**sizes))


def _flag_name(f: dataclasses.Field) -> str:
    return f.metadata["name"] or "--" + f.name.replace("_", "-")


def _add_flag(parser: argparse.ArgumentParser, f: dataclasses.Field) -> None:
    default = f.default
    kind = f.metadata["type"] or (str if default is None else type(default))
    shown = "" if default is None or "(default" in f.metadata["help"] else f" (default {default})"
    parser.add_argument(
        _flag_name(f),
        *f.metadata["flags"],
        dest=f.name,
        metavar=_flag_name(f).lstrip("-").replace("-", "_").upper(),
        type=kind,
        default=default,
        help=f.metadata["help"] + shown,
    )
