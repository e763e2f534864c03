"""`trimode bench`: the interleaved benchmark, offline over the engine or over HTTP (`--endpoint`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trimode.cli.common import (
    add_model_flags,
    dtype_sweep,
    float_list,
    int_list,
    load_llm,
    mode_list,
    sampling_default,
    spec_list,
    structured_flag,
)

if TYPE_CHECKING:
    from trimode.bench.runner import BenchConfig, Generator
    from trimode.bench.suites import BenchPrompt
    from trimode.llm import LLM

MIN_SECONDS = 3.0  # `trimode bench` offline, --repeats 0: timed seconds per configuration by default


HTTP_REPEATS = 3  # `trimode bench --endpoint`, --repeats 0: rounds, each a slice of every configuration


def run(args: argparse.Namespace) -> int:
    if args.num_prompts < 1 or args.max_tokens < 1 or args.warmup < 0:
        raise ValueError("--num-prompts and --max-tokens must be >= 1, --warmup >= 0")
    if args.suite != "long" and (args.context_lengths or args.depth is not None):
        raise ValueError("--context-lengths and --depth are for --suite long")
    args.depth = 0.5 if args.depth is None else args.depth
    if args.repeats < 0 or args.min_seconds < 0:
        raise ValueError("--repeats and --min-seconds must be >= 0 (--repeats 0: repeat until --min-seconds)")
    if args.endpoint:
        return run_endpoint(args)
    if args.concurrency or args.duration is not None or args.served_model or args.api_key:
        raise ValueError("--concurrency, --duration, --served-model and --api-key need --endpoint URL")
    if args.baseline is not None and args.baseline != "hf" and not args.baseline.startswith("hf:"):
        raise ValueError(
            f"--baseline must be 'hf' or 'hf:PATH' (a Hugging Face model directory); got {args.baseline!r}"
        )
    return run_offline(args)


@dataclasses.dataclass
class _Offline:
    """What an offline bench sweeps: `configs` over `prompts`, run by generators by name
    (`BenchConfig.generator`): the model in each of the `dtypes` swept (`llms`; `llm`, the first,
    leads the report) and, in `others` beside them, the baselines of `pairs` (baseline, trimode AR
    at batch 1)."""

    llm: LLM
    dtypes: list[str]  # [] when one dtype runs
    llms: dict[str, LLM]
    others: dict[str, Generator]
    prompts: list[BenchPrompt]
    configs: list[BenchConfig]
    context_lengths: list[int]
    pairs: list[tuple[BenchConfig, BenchConfig]]
    versions: dict[str, str]


def run_offline(args: argparse.Namespace) -> int:
    from trimode.bench.hf_baseline import baseline_summary
    from trimode.bench.machine import dtype_card, machine_card
    from trimode.bench.report import crossover
    from trimode.bench.runner import sweep

    plan = _plan(args)
    if args.baseline:
        _add_baselines(plan, args.baseline)
    run = sweep(
        plan.llm,
        plan.prompts,
        plan.configs,
        args.max_tokens,
        args.warmup,
        repeats=args.repeats,
        min_seconds=args.min_seconds,
        seed=args.seed,
        others=plan.others,
    )
    results, outputs, long = run.results, run.outputs, args.suite == "long"
    doc = {
        "command": "trimode " + " ".join(sys.argv[1:]),
        "versions": plan.versions,
        "machine": machine_card(plan.llm),
        **({"dtypes": {d: dtype_card(plan.llms[f"trimode@{d}"]) for d in plan.dtypes}} if plan.dtypes else {}),
        "suite": args.suite,
        **({"context_lengths": plan.context_lengths, "depth": args.depth} if long else {}),
        "num_prompts": len(plan.prompts),
        "max_tokens": args.max_tokens,
        "warmup": args.warmup,
        "repeats": run.repeats,
        "results": results,
        "crossover": crossover(results),
        "warnings": run.warnings,
        "samples": run.samples(),
    }
    if args.baseline:
        by_config = dict(zip(run.units, results))
        doc["baselines"] = [
            baseline_summary(by_config[hf1], by_config[ar1], outputs[hf1], outputs[ar1], hf1.engine, hf1.dtype)
            for hf1, ar1 in plan.pairs
        ]
    _print_offline(doc)
    _finish(args, doc, run.warnings)
    return 1 if args.strict and run.warnings else 0


def _plan(args: argparse.Namespace) -> _Offline:
    """The models, prompts and configurations `args` ask for (the baselines are `_add_baselines`')."""
    import torch

    from trimode import __version__
    from trimode.bench.runner import BenchConfig, expand_configs, with_control
    from trimode.bench.suites import load_suite, long_suite, parse_length

    long = args.suite == "long"
    context_lengths = [parse_length(x) for x in (args.context_lengths or "1k,4k,16k,32k").split(",")] if long else []
    dtypes = dtype_sweep(args.dtype)
    configs = expand_configs(
        mode_list(args.modes),
        int_list("--batch-sizes", args.batch_sizes or "1,4,16"),
        int_list("--block-lengths", args.block_lengths or "8,32"),
        float_list("--thresholds", args.thresholds or str(sampling_default("threshold"))),
        list(context_lengths) if long else [None],
        spec_list(args.spec) if args.spec else None,
        int_list("--logprobs", args.logprobs) if args.logprobs else None,
        structured_flag(args.structured),
        dtypes,
    )
    llms = {f"trimode@{d}": load_llm(argparse.Namespace(**{**vars(args), "dtype": d})) for d in dtypes}
    llm = next(iter(llms.values())) if llms else load_llm(args)
    if long:
        longest = max(context_lengths) + args.max_tokens
        if longest > llm.max_model_len:
            raise ValueError(
                f"--context-lengths {max(context_lengths)} plus --max-tokens {args.max_tokens} exceeds the model's "
                f"{llm.max_model_len} positions; give shorter context lengths"
            )
        prompts = long_suite(llm.tokenizer, context_lengths, args.num_prompts, args.depth, args.seed)
    else:
        prompts = load_suite(args.suite, args.num_prompts)
    # The baseline runs beside trimode AR at batch 1 (and the shortest context, where there are
    # several), in each dtype.
    pairs = []
    swept: list[str | None] = list(dtypes) or [None]
    for d in swept:
        ar1 = BenchConfig("ar", 1, context_length=min(context_lengths) if long else None, dtype=d)
        pairs.append((dataclasses.replace(ar1, engine=args.baseline or "hf"), ar1))
    versions = {"trimode": __version__, "torch": torch.__version__}
    return _Offline(llm, dtypes, llms, dict(llms), prompts, with_control(configs), context_lengths, pairs, versions)


def _add_baselines(plan: _Offline, baseline: str) -> None:
    """`--baseline hf[:PATH]`: transformers' generate() on the same weights (or PATH's), as a
    generator beside each of `plan.pairs`' trimode AR configurations, on the same batches."""
    import transformers

    from trimode.bench.hf_baseline import HFGenerator

    plan.versions["transformers"] = transformers.__version__
    path = baseline.removeprefix("hf").removeprefix(":")
    for hf1, ar1 in plan.pairs:
        mine = plan.llms.get(ar1.generator, plan.llm)
        plan.others[hf1.generator] = (
            HFGenerator.from_path(path, mine.device, mine.model.diffusion_head.weight.dtype)
            if path
            else HFGenerator.same_weights(mine)
        )
        plan.configs += [ar1] * (ar1 not in plan.configs) + [hf1]


def _print_offline(doc: dict[str, Any]) -> None:
    from trimode.bench.report import table

    results = doc["results"]
    print(table(results))
    if doc["crossover"]:
        print(doc["crossover"])
    for b in doc.get("baselines", []):
        print(
            f"HF generate{' ' + b['dtype'] if 'dtype' in b else ''}: {b['output_tokens_per_s']} tokens/s; "
            f"trimode AR {b['trimode_ar_tokens_per_s']} "
            f"({b['speed_ratio_trimode_over_hf']}x [{b['speed_ratio_ci']['lo']}, {b['speed_ratio_ci']['hi']}], "
            f"paired)"
            + (f"; identical outputs {100 * b['identical_outputs']:.1f}%" if "identical_outputs" in b else "")
        )
    total = sum(r["num_generated_tokens"] for r in results)
    print(
        f"{doc['num_prompts']} prompts x {len(results)} configurations x {doc['repeats']} repeats, interleaved: "
        f"{total} generated tokens measured"
    )


def _finish(args: argparse.Namespace, doc: dict[str, Any], warnings: list[str]) -> None:
    """Both benches' end: the warnings on stderr, and the report written where --out says."""
    from trimode.bench.report import write

    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if args.out:
        write(doc, Path(args.out))
        print(f"wrote {args.out}/results.json, report.md and plots")


def run_endpoint(args: argparse.Namespace) -> int:
    import asyncio

    from trimode import __version__
    from trimode.bench.endpoint import ENDPOINT_MODES, bench_endpoint, endpoint_configs
    from trimode.bench.machine import client_card
    from trimode.bench.report import table
    from trimode.bench.runner import with_control
    from trimode.bench.suites import load_suite

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]  # endpoint_configs checks each
    if not modes:
        raise ValueError(f"--modes must list some of {', '.join(ENDPOINT_MODES)} or mixes such as diffusion+auto")
    if args.baseline or args.batch_sizes is not None:
        raise ValueError("--baseline and --batch-sizes are for the offline bench; over HTTP use --concurrency")
    if args.min_seconds != MIN_SECONDS:
        raise ValueError("--min-seconds is for the offline bench; over HTTP use --duration and --repeats")
    if args.logprobs or args.structured:
        raise ValueError("--logprobs and --structured measure the offline engine: leave them out with --endpoint")
    if not args.endpoint.startswith(("http://", "https://")):
        raise ValueError(f"--endpoint must be an http(s) URL such as http://127.0.0.1:8000/v1; got {args.endpoint!r}")
    if args.duration is not None and args.duration <= 0:
        raise ValueError(f"--duration must be > 0 seconds; got {args.duration}")
    blocks: list[int | None] = list(int_list("--block-lengths", args.block_lengths)) if args.block_lengths else [None]
    thresholds: list[float | None] = list(float_list("--thresholds", args.thresholds)) if args.thresholds else [None]
    specs: list[str | None] = list(spec_list(args.spec)) if args.spec else [None]
    concurrency = int_list("--concurrency", args.concurrency or "1,8,32")
    configs = with_control(endpoint_configs(modes, concurrency, blocks, thresholds, specs))
    repeats = args.repeats or HTTP_REPEATS
    if args.suite == "long":
        raise ValueError("--suite long is for the offline bench (it builds prompts with the model's tokenizer)")
    prompts = load_suite(args.suite, args.num_prompts)
    base = args.endpoint.rstrip("/")
    print(f"{len(configs)} configurations x {repeats} rounds against {base}", flush=True)
    run = asyncio.run(
        bench_endpoint(
            base,
            prompts,
            configs,
            args.max_tokens,
            args.duration,
            args.warmup,
            repeats=repeats,
            seed=args.seed,
            api_key=args.api_key,
            model=args.served_model,
            on_slice=lambda cfg, r: print(f"round {r + 1}/{repeats}: {cfg.label}", flush=True),
        )
    )
    results = run.results
    doc = {
        "command": "trimode " + " ".join(sys.argv[1:]),
        "versions": {"trimode": __version__},
        "machine": client_card(),
        "endpoint": base,
        "model": run.model,
        "suite": args.suite,
        "num_prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "warmup": args.warmup,
        "duration": args.duration,
        "repeats": repeats,
        "results": results,
        "warnings": run.warnings,
        "samples": run.samples(),
    }
    print(table(results))
    failed = sum(r["num_failed"] for r in results)
    print(f"{sum(r['num_requests'] for r in results)} requests measured, {failed} failed")
    _finish(args, doc, run.warnings)
    return 1 if failed or (args.strict and run.warnings) else 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    b = sub.add_parser("bench", help="tokens/s, tokens per forward, latency and accuracy per mode and batch size")
    add_model_flags(b)
    b.add_argument(
        "--modes",
        default="ar,diffusion,selfspec",
        help="ar, diffusion, selfspec; over HTTP also mixed (round-robin) and default (no mode sent)",
    )
    b.add_argument(
        "--suite",
        default="tasks",
        help="tasks, code, long (recall and continuation at --context-lengths), or a JSONL file",
    )
    b.add_argument(
        "--context-lengths",
        help="--suite long: prompt lengths in the model's tokens, k = 1024 (default 1k,4k,16k,32k); "
        "--num-prompts is then per length",
    )
    b.add_argument(
        "--depth",
        type=float,
        help="--suite long: where the recalled key sits, 0 (start) to 1 (end of the context; default 0.5)",
    )
    b.add_argument("--batch-sizes", help="offline only (default 1,4,16)")
    b.add_argument("--max-tokens", type=int, default=48)
    b.add_argument("--block-lengths", help="default 8,32 offline; the server's default over HTTP")
    b.add_argument(
        "--spec",
        help="self-spec's kinds to run, comma-separated: linear, quadratic (default linear offline, the "
        "server's over HTTP); quadratic feeds b(b+1) tokens per row per pass",
    )
    b.add_argument(
        "--structured",
        help="offline: also run every AR and self-spec configuration under this grammar, given as "
        'SamplingParams.structured in JSON, e.g. \'{"regex": "[0-9 ]+"}\'',
    )
    b.add_argument(
        "--logprobs",
        help="offline: also run every configuration asking for this many logprobs per token (comma-separated), "
        "interleaved with the plain runs, to measure what reporting them costs",
    )
    b.add_argument(
        "--thresholds", help=f"default {sampling_default('threshold')} offline; the server's default over HTTP"
    )
    b.add_argument("--num-prompts", type=int, default=50)
    b.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="per configuration, not measured: batches offline, requests per client over HTTP",
    )
    b.add_argument(
        "--repeats",
        type=int,
        default=0,
        help="passes over the prompts, configurations interleaved (offline default 0: until --min-seconds); "
        f"over HTTP, rounds of one slice per configuration (default {HTTP_REPEATS})",
    )
    b.add_argument(
        "--min-seconds",
        type=float,
        default=MIN_SECONDS,
        help="offline, with --repeats 0: timed seconds per configuration",
    )
    b.add_argument(
        "--strict", action="store_true", help="exit 1 if the A/A control or a tokens-per-forward bound fails"
    )
    b.add_argument("--seed", type=int, default=0, help="seeds the order of configurations in each repeat")
    b.add_argument(
        "--baseline",
        help="'hf': transformers generate() on the same weights; 'hf:PATH': on any Hugging Face causal LM "
        "directory, with its own chat template (interleaved with the sweep, batch 1, greedy)",
    )
    b.add_argument("--out", help="directory for results.json, report.md and the plots")
    b.add_argument("--endpoint", help="bench a running OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    b.add_argument("--concurrency", help="over HTTP: closed-loop clients, comma-separated (default 1,8,32)")
    b.add_argument(
        "--duration",
        type=float,
        help="over HTTP: seconds of load per configuration, over all rounds (default: every prompt once per round)",
    )
    b.add_argument("--api-key", help="over HTTP: sent as `Authorization: Bearer KEY`")
    b.add_argument("--served-model", help="over HTTP: the `model` to request (default: the first of /v1/models)")
    b.set_defaults(func=run)
