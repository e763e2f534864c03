"""Sweeps of benchmark configurations (mode, batch size, block length, threshold, dtype; or a
baseline engine) over a suite.

A sweep interleaves its configurations (a shared machine drifts, and neighbours come and go: what
runs back to back absorbs that unevenly): repeat by repeat, in a shuffled order per repeat (reversed
on every other batch), prompt batch k of every configuration runs before batch k + 1 of any. Each
timed batch is a unit; rates and ratios get bootstrap intervals over the units
(`trimode.bench.stats`), paired where two configurations ran the same batches. An A/A control (one
configuration measured twice) and a tokens-per-forward bound make the sweep check itself
(`Sweep.warnings`).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol, TypeVar, cast

from tqdm import tqdm

from trimode.bench.metrics import add_speedup_vs_ar, is_ar, summarize
from trimode.bench.stats import rate_interval
from trimode.bench.suites import BenchPrompt, short_length
from trimode.decoding import uses
from trimode.outputs import GenerationOutput
from trimode.sampling_params import SamplingParams
from trimode.tokenizer import Tokenizer


class Generator(Protocol):
    tokenizer: Tokenizer

    def generate(
        self, prompts: list[list[int]], params: list[SamplingParams], use_tqdm: bool, /
    ) -> list[GenerationOutput]: ...


class SweepConfig(Protocol):
    """What a sweep needs of a configuration (a frozen dataclass, offline or over HTTP)."""

    @property
    def mode(self) -> str: ...

    @property
    def control(self) -> bool: ...

    @property
    def load(self) -> Any: ...  # comparable: the lightest load is the A/A control's


C = TypeVar("C", bound=SweepConfig)


@dataclass(frozen=True)
class BenchConfig:
    mode: str
    batch_size: int
    block_length: int | None = None  # modes that read it (decoding.uses)
    threshold: float | None = None
    spec: str | None = None  # self-spec's kind when swept (`--spec`); None: linear
    control: bool = False  # the A/A control: a second measurement of the same configuration
    engine: str = "trimode"  # or a baseline's name ("hf"), whose generator runs this configuration
    context_length: int | None = None  # the long suite: runs the prompts of this length
    logprobs: int | None = None  # SamplingParams.logprobs: what reporting them costs, beside the plain run
    structured: str | None = None  # SamplingParams.structured as JSON: what the grammar's masks cost
    dtype: str | None = None  # with several dtypes swept (`--dtype float32,bfloat16`), the model's here

    @property
    def generator(self) -> str:
        """The name of the generator that runs it: its engine, in its dtype when dtypes are swept."""
        return self.engine if self.dtype is None else f"{self.engine}@{self.dtype}"

    @property
    def load(self) -> tuple[int, int]:
        """How heavy a configuration is to run: context length, then batch size."""
        return self.context_length or 0, self.batch_size

    @property
    def label(self) -> str:
        engine = self.engine.split(":", 1)  # hf:PATH shows as hf:<its directory's name>
        name = engine[0] if len(engine) == 1 else f"{engine[0]}:{engine[1].rstrip('/').rsplit('/', 1)[-1]}"
        parts = [self.mode if self.engine == "trimode" else name, f"bs{self.batch_size}"]
        if self.block_length is not None:
            parts.append(f"B{self.block_length}")
        if self.threshold is not None:
            parts.append(f"t{self.threshold:g}")
        if self.spec is not None and self.spec != "linear":
            parts.append(self.spec)
        if self.context_length is not None:
            parts.append(f"ctx{short_length(self.context_length)}")
        if self.logprobs is not None:
            parts.append(f"lp{self.logprobs}")
        if self.structured is not None:
            parts.append("structured")
        if self.dtype is not None:
            parts.append(self.dtype)
        if self.control:
            parts.append("(A/A)")
        return " ".join(parts)


def expand_configs(
    modes: list[str],
    batch_sizes: list[int],
    block_lengths: list[int],
    thresholds: list[float],
    context_lengths: list[int | None] | None = None,
    specs: list[str] | None = None,
    logprobs: list[int] | None = None,
    structured: str | None = None,
    dtypes: list[str] | None = None,
) -> list[BenchConfig]:
    """Every configuration (with `specs`, self-spec's in each of those kinds); with `logprobs`, each
    once more per count, asking for that many; with `structured` (SamplingParams.structured as
    JSON), each once more under that grammar (diffusion, which takes none, excepted); with `dtypes`,
    all of that in each dtype."""
    configs = []
    for length in context_lengths or [None]:
        for bs in batch_sizes:
            for mode in modes:
                blocks = block_lengths if uses(mode, "block_length") else [None]
                ts = thresholds if uses(mode, "threshold") else [None]
                kinds: list[str | None] = list(specs) if specs and uses(mode, "spec") else [None]
                configs += [
                    BenchConfig(mode, bs, b, t, s, context_length=length) for b in blocks for s in kinds for t in ts
                ]
    extra = [replace(c, logprobs=k) for k in logprobs or [] for c in configs]
    if structured is not None:
        extra += [replace(c, structured=structured) for c in configs if c.mode != "diffusion"]
    swept: list[str | None] = list(dtypes) if dtypes else [None]
    return [replace(c, dtype=d) for d in swept for c in configs + extra]


def encode(llm: Generator, prompts: list[BenchPrompt]) -> list[list[int]]:
    """Token ids of each prompt (chats rendered with the template): every mode gets the same ids."""
    return [
        llm.tokenizer.encode_chat(p.chat()) if p.messages else llm.tokenizer.encode(p.prompt or "") for p in prompts
    ]


def with_control(configs: list[C]) -> list[C]:
    """`configs` plus the A/A control: a second copy of AR at the lightest load (of the first
    configuration when AR is not swept). Offline and HTTP configurations alike."""
    ar = [c for c in configs if c.mode == "ar"]
    original = min(ar, key=lambda c: c.load) if ar else configs[0]
    return configs + [replace(cast(Any, original), control=True)]


def reference_key(r: dict[str, Any]) -> tuple[Any, ...]:
    """What a result's speed-up is measured at: AR's run of the same batch size, context length and
    dtype."""
    return r["batch_size"], r.get("context_length"), r.get("dtype")


def _params(cfg: BenchConfig, prompts: list[BenchPrompt], max_tokens: int) -> list[SamplingParams]:
    return [
        SamplingParams(
            temperature=0.0,
            mode=cfg.mode,
            max_tokens=p.max_tokens or max_tokens,
            seed=0,
            block_length=cfg.block_length or 32,
            spec=cfg.spec or "linear",
            threshold=0.9 if cfg.threshold is None else cfg.threshold,
            logprobs=cfg.logprobs,
            structured=None if cfg.structured is None else json.loads(cfg.structured),
        )
        for p in prompts
    ]


@dataclass
class Unit:
    """One timed batch of one configuration."""

    batch: int  # index of its prompt batch
    repeat: int
    tokens: int
    seconds: float


@dataclass
class Sweep:
    results: list[dict[str, Any]]
    outputs: dict[BenchConfig, list[GenerationOutput]]  # per configuration, its first repeat's outputs
    units: dict[BenchConfig, list[Unit]]
    repeats: int
    warnings: list[str] = field(default_factory=list)

    def samples(self) -> dict[str, list[dict[str, Any]]]:
        return unit_samples(self.units)


def unit_samples(units: dict[Any, list[Unit]]) -> dict[str, list[dict[str, Any]]]:
    """Every unit of every configuration, by label, for results.json."""
    return {cfg.label: [asdict(u) for u in us] for cfg, us in units.items()}


MAX_REPEATS = 50
MIN_CONTROL_UNITS = 6  # below this a bootstrap over the A/A control's units draws from too few values


def sweep(
    llm: Generator,
    prompts: list[BenchPrompt],
    configs: list[BenchConfig],
    max_tokens: int,
    warmup: int,
    show_progress: bool = True,
    repeats: int = 1,
    min_seconds: float = 0.0,
    seed: int = 0,
    others: dict[str, Generator] | None = None,
) -> Sweep:
    """Run `configs` interleaved: warm-up batches round-robin, then per repeat a shuffled order of
    the configurations and, batch by batch, that batch of each (in reverse on odd batches).
    `repeats` 0: repeat until every configuration has `min_seconds` of timed batches (at most
    MAX_REPEATS). A configuration runs on `llm`, or on `others[cfg.generator]` where that names one
    (a baseline's engine; `trimode@bfloat16`: the model in another dtype)."""
    engines = {"trimode": llm, **(others or {})}
    if missing := {cfg.generator for cfg in configs} - engines.keys():
        raise ValueError(f"no generator for {', '.join(sorted(missing))}")
    ids = {name: encode(g, prompts) for name, g in engines.items()}  # each engine's own tokens
    own = {cfg: [i for i, p in enumerate(prompts) if p.context_length == cfg.context_length] for cfg in configs}
    if empty := [cfg.label for cfg in configs if not own[cfg]]:
        raise ValueError(f"no prompts of the context length of {', '.join(empty)}")
    params = {cfg: _params(cfg, [prompts[i] for i in own[cfg]], max_tokens) for cfg in configs}
    starts = {cfg: list(range(0, len(own[cfg]), cfg.batch_size)) for cfg in configs}

    def run(cfg: BenchConfig, k: int) -> tuple[list[GenerationOutput], float]:
        s, n = starts[cfg][k], cfg.batch_size
        batch = [ids[cfg.generator][i] for i in own[cfg][s : s + n]]
        t0 = time.perf_counter()
        outs = engines[cfg.generator].generate(batch, params[cfg][s : s + n], False)  # the sweep has its own bar
        return outs, time.perf_counter() - t0

    for k in range(warmup):
        for cfg in configs:
            if k < len(starts[cfg]):
                run(cfg, k)
    units: dict[BenchConfig, list[Unit]] = {cfg: [] for cfg in configs}
    outputs: dict[BenchConfig, list[list[GenerationOutput]]] = {cfg: [] for cfg in configs}
    most = max(len(v) for v in starts.values())
    bar = tqdm(disable=not show_progress, unit="batch")
    r = 0
    while r < (repeats or MAX_REPEATS):
        order = list(configs)
        random.Random(seed + r).shuffle(order)
        for k in range(most):
            # Every other batch in reverse (ABBA): a drift linear in time cancels over each pair.
            for cfg in order if k % 2 == 0 else order[::-1]:
                if k < len(starts[cfg]):
                    bar.set_description(f"repeat {r + 1} {cfg.label}")
                    outs, seconds = run(cfg, k)
                    units[cfg].append(Unit(k, r, sum(o.num_generated_tokens for o in outs), seconds))
                    outputs[cfg].append(outs)
                    bar.update()
        r += 1
        if not repeats and min(sum(u.seconds for u in v) for v in units.values()) >= min_seconds:
            break
    bar.close()
    first = {cfg: [o for batch in outputs[cfg][: len(starts[cfg])] for o in batch] for cfg in configs}
    mine = {cfg: [prompts[i] for i in own[cfg]] for cfg in configs}
    results = _summaries(mine, units, outputs)
    return Sweep(results, first, units, r, add_intervals(results, list(units.values()), reference_key))


def _summaries(
    prompts: dict[BenchConfig, list[BenchPrompt]],
    units: dict[BenchConfig, list[Unit]],
    outputs: dict[BenchConfig, list[list[GenerationOutput]]],
) -> list[dict[str, Any]]:
    """Each configuration's figures over its prompts (`prompts[cfg]`, in the order they ran in
    every repeat)."""
    results = []
    for cfg, mine in prompts.items():
        outs = [o for batch in outputs[cfg] for o in batch]
        correct = [p.is_correct(o.text) for p, o in zip(mine * (len(outs) // len(mine)), outs)]
        wall = sum(u.seconds for u in units[cfg])
        forward_ms = [b[0].forward_ms for b in outputs[cfg]]
        results.append({"label": cfg.label, **asdict(cfg), **summarize(outs, correct, wall, forward_ms)})
    add_speedup_vs_ar(results, reference_key)
    return results


def add_intervals(
    results: list[dict[str, Any]], units: list[list[Unit]], key: Callable[[dict[str, Any]], Hashable]
) -> list[str]:
    """Add each result's intervals (tokens/s over `units[i]`, the units of `results[i]`; speed-up over
    AR at the same `key`, paired) and the tokens-per-forward prediction; return the warnings: an A/A
    control whose ratio interval misses 1.0 (or that has too few units to tell), a speed-up whose
    interval lies above what tokens per forward allow."""
    warnings = []
    ar_at = {key(r): (u, r) for u, r in zip(units, results) if is_ar(r)}
    for u, r in zip(units, results):
        r["output_tokens_per_s_ci"] = rate_interval([x.tokens for x in u], [x.seconds for x in u]).as_dict(2)
        ar = ar_at.get(key(r))
        if ar is None:
            continue
        base, label, ar_label = ar[0], r["label"], ar[1]["label"]
        ratio = rate_interval(
            [x.tokens for x in u], [x.seconds for x in u], [x.tokens for x in base], [x.seconds for x in base]
        )
        r["speedup_vs_ar_ci"] = ratio.as_dict()
        if r.get("control") and len(u) < MIN_CONTROL_UNITS:
            warnings.append(
                f"A/A control: {label} has {len(u)} timed units, too few for its interval to mean anything "
                f"(at least {MIN_CONTROL_UNITS}): raise --num-prompts or --repeats"
            )
        elif r.get("control") and not ratio.contains(1.0):
            warnings.append(
                f"A/A control: {label} over {ar_label} is {ratio.median:.3f} "
                f"[{ratio.lo:.3f}, {ratio.hi:.3f}], which excludes 1.0: the machine was not steady"
            )
        if not (r["tokens_per_forward"] and ar[1]["tokens_per_forward"]):
            continue  # a server that does not report its forwards
        # If every forward cost one AR forward, the speed-up would be the tokens-per-forward ratio.
        prediction = r["tokens_per_forward"] / ar[1]["tokens_per_forward"]
        r["tpf_prediction"] = round(prediction, 3)
        r["speedup_vs_tpf_prediction"] = round(r["speedup_vs_ar"] / prediction, 3)
        # No forward costs less than an AR step, and both ran the same prefills. With fewer forwards
        # than AR, the speed-up is at most the prediction (the shared prefill only pulls it towards
        # 1); with more, at most 1 (the prediction can be far below: a long prefill's chunks are
        # most of both runs' time, and every one of its forwards counts in tokens per forward).
        bound = max(prediction, 1.0)
        if r["mode"] != "ar" and ratio.lo > bound * 1.001:  # AR's own bound is the A/A control's
            warnings.append(
                f"{label}: speed-up over AR {ratio.median:.2f} [{ratio.lo:.2f}, {ratio.hi:.2f}] exceeds what its "
                f"tokens per forward allow ({bound:.2f}): a measurement error until explained"
            )
    return warnings
