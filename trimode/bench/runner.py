"""Run one configuration (mode, batch size, block length, threshold) over a suite, and sweeps of them."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from tqdm import tqdm

from trimode.bench.metrics import add_speedup_vs_ar, summarize
from trimode.bench.suites import BenchPrompt
from trimode.decoding import uses
from trimode.outputs import GenerationOutput
from trimode.sampling_params import SamplingParams
from trimode.tokenizer import Tokenizer


class Generator(Protocol):
    tokenizer: Tokenizer

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[GenerationOutput]: ...


@dataclass(frozen=True)
class BenchConfig:
    mode: str
    batch_size: int
    block_length: int | None = None  # modes that read it (decoding.uses)
    threshold: float | None = None

    @property
    def label(self) -> str:
        parts = [self.mode, f"bs{self.batch_size}"]
        if self.block_length is not None:
            parts.append(f"B{self.block_length}")
        if self.threshold is not None:
            parts.append(f"t{self.threshold:g}")
        return " ".join(parts)


def expand_configs(
    modes: list[str], batch_sizes: list[int], block_lengths: list[int], thresholds: list[float]
) -> list[BenchConfig]:
    configs = []
    for bs in batch_sizes:
        for mode in modes:
            blocks = block_lengths if uses(mode, "block_length") else [None]
            ts = thresholds if uses(mode, "threshold") else [None]
            configs += [BenchConfig(mode, bs, b, t) for b in blocks for t in ts]
    return configs


def encode(llm: Generator, prompts: list[BenchPrompt]) -> list[list[int]]:
    """Token ids of each prompt (chats rendered with the template): every mode gets the same ids."""
    return [
        llm.tokenizer.encode_chat(p.chat()) if p.messages else llm.tokenizer.encode(p.prompt or "") for p in prompts
    ]


def run_config(
    llm: Generator,
    prompts: list[BenchPrompt],
    ids: list[list[int]],
    cfg: BenchConfig,
    max_tokens: int,
    warmup: int,
    seed: int = 0,
) -> tuple[dict[str, Any], list[GenerationOutput]]:
    """Warm-up batches (not measured), then every prompt once, `batch_size` at a time."""
    params = [
        SamplingParams(
            mode=cfg.mode,
            max_tokens=p.max_tokens or max_tokens,
            seed=seed,
            block_length=cfg.block_length or 32,
            threshold=0.9 if cfg.threshold is None else cfg.threshold,
        )
        for p in prompts
    ]
    starts = range(0, len(prompts), cfg.batch_size)
    for s in list(starts)[:warmup]:
        llm.generate(ids[s : s + cfg.batch_size], params[s : s + cfg.batch_size])
    outputs: list[GenerationOutput] = []
    forward_ms: list[dict[str, float]] = []
    wall = 0.0
    for s in starts:
        t0 = time.perf_counter()
        outs = llm.generate(ids[s : s + cfg.batch_size], params[s : s + cfg.batch_size])
        wall += time.perf_counter() - t0
        outputs += outs
        forward_ms.append(outs[0].forward_ms)
    correct = [p.is_correct(o.text) for p, o in zip(prompts, outputs)]
    return {**asdict(cfg), **summarize(outputs, correct, wall, forward_ms)}, outputs


def sweep(
    llm: Generator,
    prompts: list[BenchPrompt],
    configs: list[BenchConfig],
    max_tokens: int,
    warmup: int,
    show_progress: bool = True,
) -> tuple[list[dict[str, Any]], dict[BenchConfig, list[GenerationOutput]]]:
    ids = encode(llm, prompts)
    results, outputs = [], {}
    bar = tqdm(configs, disable=not show_progress, unit="config")
    for cfg in bar:
        bar.set_description(cfg.label)
        result, outs = run_config(llm, prompts, ids, cfg, max_tokens, warmup)
        results.append(result)
        outputs[cfg] = outs
    add_speedup_vs_ar(results, "batch_size")
    for r in results:
        # If every forward cost one AR step, the speed-up would equal the tokens-per-forward ratio.
        speedup = r["speedup_vs_ar"]
        r["speedup_vs_tpf_prediction"] = round(speedup / r["tokens_per_forward"], 3) if speedup is not None else None
    return results, outputs
