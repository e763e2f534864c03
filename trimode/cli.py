"""trimode: NVIDIA's Nemotron-Labs-Diffusion models in all three decoding modes (ar, diffusion,
selfspec). Commands: generate, chat, serve, bench, eval, train, train-tokenizer, make-checkpoint;
each takes --help. Bad input prints one line (no traceback) and exits 2."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trimode.kv_cache import PAGE_SIZE
from trimode.sampling_params import REQUEST_MODES, SPECS
from trimode.server.logprobs import MAX_LOGPROB_ENTRIES

if TYPE_CHECKING:
    from trimode.llm import LLM

MIN_SECONDS = 3.0  # `trimode bench` offline, --repeats 0: timed seconds per configuration by default
HTTP_REPEATS = 3  # `trimode bench --endpoint`, --repeats 0: rounds, each a slice of every configuration

API_KEY_ENV = "TRIMODE_API_KEY"


def _generate(args: argparse.Namespace) -> int:
    from trimode.sampling_params import SamplingParams

    params = SamplingParams(
        mode=args.mode,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
        block_length=args.block_length,
        spec=args.spec,
        threshold=args.threshold,
    )
    llm = _load_llm(args)
    start = time.perf_counter()
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params, use_tqdm=False)
    else:
        outputs = llm.generate(args.prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    for i, out in enumerate(outputs):
        if args.json:
            print(json.dumps(out.summary()))
        else:
            if len(outputs) > 1:  # which prompt each answer answers
                print(f"== prompt {i + 1}: {args.prompts[i]!r}")
            print(out.text)
            print(
                f"[{out.mode}: {out.num_generated_tokens} tokens, {out.num_forwards} forwards, "
                f"{out.tokens_per_forward:.2f} tokens/forward, finish={out.finish_reason}]",
                file=sys.stderr,
            )
    total = sum(o.num_generated_tokens for o in outputs)
    print(
        f"[{len(outputs)} prompts, {total} tokens in {seconds:.3f}s: {total / seconds:.1f} tokens/s]", file=sys.stderr
    )
    return 0


def _chat(args: argparse.Namespace) -> int:
    """A chat in the terminal: each answer streams as it commits; the conversation so far is the
    prompt of the next turn. Line editing and input history come from readline where Python has it."""
    try:
        import readline  # noqa: F401  (input() then edits lines and keeps a history)
    except ImportError:
        pass
    from trimode.sampling_params import SamplingParams

    params = SamplingParams(
        mode=args.mode,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        block_length=args.block_length,
    )
    llm = _load_llm(args)
    engine = llm.engine(max_batch=1, max_queue=1)
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    print("trimode chat: /reset forgets the conversation, /exit (or Ctrl-D) leaves", file=sys.stderr)
    for turn in itertools.count():
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        engine.add_tokenized(f"turn-{turn}", llm.tokenizer.encode_chat(history), params)
        answer = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.error is not None:
                    raise ValueError(out.error)
                print(out.delta_text, end="", flush=True)
                answer = out.output or answer
        print()
        if answer is not None:
            history.append({"role": "assistant", "content": answer.text})
    return 0


def _model_config_from_args(args: argparse.Namespace, vocab: int | None):
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


def _make_checkpoint(args: argparse.Namespace) -> int:
    from trimode.checkpoint import make_checkpoint

    cfg = _model_config_from_args(args, None)
    out = make_checkpoint(
        cfg,
        args.out,
        seed=args.seed,
        dtype=args.dtype,
        draft_lora_rank=args.draft_lora_rank,
        shard_bytes=int(args.shard_gb * 2**30),
    )
    print(f"wrote {args.preset} checkpoint ({cfg.num_parameters / 1e6:.1f}M parameters) to {out}")
    return 0


def _train_tokenizer(args: argparse.Namespace) -> int:
    from trimode.tokenizer_build import build_tokenizer, write_tokenizer_files
    from trimode.train.data import corpus_texts

    tok = build_tokenizer(args.vocab, corpus_texts(args.data), split_digits=not args.no_split_digits)
    write_tokenizer_files(tok, args.out, args.max_length)
    print(f"wrote a {tok.get_vocab_size()}-token byte-level BPE tokenizer to {args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from trimode.llm import resolve_device
    from trimode.tokenizer import SPECIAL_TOKEN_IDS, Tokenizer
    from trimode.tokenizer_build import build_tokenizer, write_tokenizer_files
    from trimode.train.data import corpus_texts
    from trimode.train.init import initial_model
    from trimode.train.parallel import init_ranks
    from trimode.train.trainer import TrainConfig, train

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})
    out = Path(args.out)
    tokenizer_dir = Path(args.tokenizer) if args.tokenizer else Path(args.init) if args.init else out / "tokenizer"
    ranks = init_ranks(resolve_device(cfg.device), cfg.tp)  # under torchrun, joins the other ranks
    if not (tokenizer_dir / "tokenizer.json").is_file():
        if args.tokenizer or args.init:
            raise FileNotFoundError(f"{tokenizer_dir / 'tokenizer.json'} is missing")
        if ranks.is_main:
            vocab = args.vocab or 4096
            tokenizer = build_tokenizer(vocab, corpus_texts(cfg.data), split_digits=True)
            write_tokenizer_files(tokenizer, tokenizer_dir, 262144)
    ranks.barrier()
    vocab = Tokenizer.from_dir(tokenizer_dir).vocab_size
    model_cfg = None if args.init else _model_config_from_args(args, vocab)
    if model_cfg is not None:
        model_cfg = dataclasses.replace(
            model_cfg,
            eos_token_id=(SPECIAL_TOKEN_IDS["<|im_end|>"],),
            pad_token_id=SPECIAL_TOKEN_IDS["<pad>"],
            block_size=cfg.block_size,
        )
    model = initial_model(args.init, model_cfg, cfg.seed, args.mask_token_id)
    if model.config.vocab_size < vocab:
        raise ValueError(f"the model's vocab_size {model.config.vocab_size} is smaller than the tokenizer's {vocab}")
    extra = {
        "command": "trimode " + " ".join(sys.argv[1:]),
        "init": args.init,
        "tokenizer": str(tokenizer_dir),
        "data_sources": cfg.data,
    }
    log = train(cfg, model, tokenizer_dir, resume=args.resume, extra_args=extra, stop_at=args.stop_at)
    if log and ranks.is_main:
        print(json.dumps(log[-1]))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from trimode.evaluate import heldout_text_loss, task_accuracy
    from trimode.tasks import TASKS
    from trimode.train.data import stdlib_texts

    modes = _mode_list(args.modes)
    if args.suite != "tasks":
        raise ValueError(f"--suite must be 'tasks' (the held-out synthetic tasks); got {args.suite!r}")
    llm = _load_llm(args)
    report = task_accuracy(
        llm, modes, n=args.num_examples, block_length=args.block_length, spec=args.spec, threshold=args.threshold
    )
    docs = stdlib_texts(held_out=True)
    result = {
        "accuracy": report,
        "stdlib_heldout_loss_nats": round(heldout_text_loss(llm, docs), 4),
        "num_examples_per_task": args.num_examples,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    same = f"same tokens as {modes[0]}"
    print("| mode | " + " | ".join(TASKS) + f" | tokens/forward | {same} |")
    print("|---" * (len(TASKS) + 3) + "|")
    for mode, row in report.items():
        cells = " | ".join(f"{100 * row[t]:.1f}%" for t in TASKS)
        match = row.get(f"same_tokens_as_{modes[0]}")
        print(
            f"| {mode} | {cells} | {row['tokens_per_forward']:.2f} | "
            f"{'-' if match is None else f'{100 * match:.1f}%'} |"
        )
    print(f"held-out stdlib loss: {result['stdlib_heldout_loss_nats']:.4f} nats/token")
    return 0


def _spec_list(text: str) -> list[str]:
    specs = [s.strip() for s in text.split(",") if s.strip()]
    if not specs or any(s not in SPECS for s in specs):
        raise ValueError(f"--spec must list some of {', '.join(SPECS)}; got {text!r}")
    return specs


def _mode_list(text: str, allowed: Sequence[str] = REQUEST_MODES) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if not modes or any(m not in allowed for m in modes):
        raise ValueError(f"--modes must list some of {', '.join(allowed)}; got {text!r}")
    return modes


def _dtype_sweep(flag: str) -> list[str]:
    """`--dtype float32,bfloat16` (the bench): the dtypes to sweep; [] for a single dtype."""
    from trimode.config import DTYPES

    if "," not in flag:
        return []
    dtypes = flag.split(",")
    if len(set(dtypes)) != len(dtypes) or not set(dtypes) <= DTYPES.keys():
        raise ValueError(f"--dtype lists distinct dtypes to sweep, of {', '.join(DTYPES)}; got {flag!r}")
    return dtypes


def _load_llm(args: argparse.Namespace, **kwargs: Any) -> LLM:
    """The model of a command's `_add_model_flags`."""
    from trimode.llm import LLM

    return LLM(
        model=args.model,
        revision=args.revision,
        dtype=args.dtype,
        device=args.device,
        compile=args.compile,
        tensor_parallel_size=args.tensor_parallel_size,
        **kwargs,
    )


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    """--model, --dtype, --device, --tensor-parallel-size, --compile / --enforce-eager: how every
    command that runs a model loads it."""
    p.add_argument("--model", help="checkpoint directory or Hugging Face hub id (default: the embedded model)")
    p.add_argument("--revision", help="the hub id's branch, tag or commit (default: main)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=1,
        help="split the weights and KV heads over N processes: under torchrun, the N it launched; "
        "otherwise N - 1 workers this command spawns (GPUs 0..N-1, or the CPU)",
    )
    # Default "auto": on a CPU, forwards whose compiled program is in the cache run it, the rest
    # eager; on a GPU, decode passes run as CUDA graphs.
    speed = p.add_mutually_exclusive_group()
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


def _int_list(flag: str, text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"{flag} must be comma-separated integers; got {text!r}") from e
    if not values or min(values) < 1:
        raise ValueError(f"{flag} must list integers >= 1; got {text!r}")
    return values


THRESHOLD_HELP = "diffusion: reveal every position at least this confident (default 0.9); 'none': one per pass"
SPEC_HELP = (
    "selfspec: linear (a draft pass and a verify pass per cycle; the default) or quadratic (one pass of "
    "b(b+1) tokens per row verifies and drafts)"
)


def _threshold(text: str) -> float | None:
    """A --threshold value: a number, or `none` for one position per pass."""
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1] or 'none'; got {text!r}") from e


def _float_list(flag: str, text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"{flag} must be comma-separated numbers; got {text!r}") from e
    if not values or not all(0 <= v <= 1 for v in values):
        raise ValueError(f"{flag} must list numbers in [0, 1]; got {text!r}")
    return values


def _bench(args: argparse.Namespace) -> int:
    if args.num_prompts < 1 or args.max_tokens < 1 or args.warmup < 0:
        raise ValueError("--num-prompts and --max-tokens must be >= 1, --warmup >= 0")
    if args.suite != "long" and (args.context_lengths or args.depth is not None):
        raise ValueError("--context-lengths and --depth are for --suite long")
    args.depth = 0.5 if args.depth is None else args.depth
    if args.repeats < 0 or args.min_seconds < 0:
        raise ValueError("--repeats and --min-seconds must be >= 0 (--repeats 0: repeat until --min-seconds)")
    if args.endpoint:
        return _bench_endpoint(args)
    if args.concurrency or args.duration is not None or args.served_model or args.api_key:
        raise ValueError("--concurrency, --duration, --served-model and --api-key need --endpoint URL")

    import torch

    from trimode import __version__
    from trimode.bench.hf_baseline import baseline_summary
    from trimode.bench.machine import dtype_card, machine_card
    from trimode.bench.report import crossover, table, write
    from trimode.bench.runner import BenchConfig, Generator, expand_configs, sweep, with_control
    from trimode.bench.suites import load_suite, long_suite, parse_length

    modes = _mode_list(args.modes)
    if args.baseline is not None and args.baseline != "hf" and not args.baseline.startswith("hf:"):
        raise ValueError(
            f"--baseline must be 'hf' or 'hf:PATH' (a Hugging Face model directory); got {args.baseline!r}"
        )
    long = args.suite == "long"
    context_lengths = [parse_length(x) for x in (args.context_lengths or "1k,4k,16k,32k").split(",")] if long else []
    lengths: list[int | None] = list(context_lengths) if long else [None]
    dtypes = _dtype_sweep(args.dtype)
    configs = expand_configs(
        modes,
        _int_list("--batch-sizes", args.batch_sizes or "1,4,16"),
        _int_list("--block-lengths", args.block_lengths or "8,32"),
        _float_list("--thresholds", args.thresholds or "0.9"),
        lengths,
        _spec_list(args.spec) if args.spec else None,
        _int_list("--logprobs", args.logprobs) if args.logprobs else None,
        _structured_flag(args.structured),
        dtypes,
    )
    # The generators by name (`BenchConfig.generator`): the model in each swept dtype (the first is
    # `llm`, whose card leads the report), and the baseline beside it.
    llms = {f"trimode@{d}": _load_llm(argparse.Namespace(**{**vars(args), "dtype": d})) for d in dtypes}
    llm = next(iter(llms.values())) if llms else _load_llm(args)
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
    versions = {"trimode": __version__, "torch": torch.__version__}
    configs, others = with_control(configs), dict[str, Generator](llms)
    # The baseline runs beside trimode AR at batch 1 (and the shortest context, where there are
    # several), in each dtype.
    pairs = []  # (baseline, trimode AR) configurations
    swept: list[str | None] = list(dtypes) if dtypes else [None]
    for d in swept:
        ar1 = BenchConfig("ar", 1, context_length=min(context_lengths) if long else None, dtype=d)
        pairs.append((dataclasses.replace(ar1, engine=args.baseline or "hf"), ar1))
    if args.baseline:
        import transformers

        from trimode.bench.hf_baseline import HFGenerator

        versions["transformers"] = transformers.__version__
        path = args.baseline.removeprefix("hf").removeprefix(":")
        for hf1, ar1 in pairs:
            mine = llms.get(ar1.generator, llm)
            others[hf1.generator] = (
                HFGenerator.from_path(path, mine.device, mine.model.diffusion_head.weight.dtype)
                if path
                else HFGenerator.same_weights(mine)
            )
            configs += [ar1] * (ar1 not in configs) + [hf1]  # the baseline beside trimode AR on the same batches
    run = sweep(
        llm,
        prompts,
        configs,
        args.max_tokens,
        args.warmup,
        repeats=args.repeats,
        min_seconds=args.min_seconds,
        seed=args.seed,
        others=others,
    )
    results, outputs = run.results, run.outputs
    doc = {
        "command": "trimode " + " ".join(sys.argv[1:]),
        "versions": versions,
        "machine": machine_card(llm),
        **({"dtypes": {d: dtype_card(llms[f"trimode@{d}"]) for d in dtypes}} if dtypes else {}),
        "suite": args.suite,
        **({"context_lengths": lengths, "depth": args.depth} if long else {}),
        "num_prompts": len(prompts),
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
            for hf1, ar1 in pairs
        ]
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
        f"{len(prompts)} prompts x {len(results)} configurations x {run.repeats} repeats, interleaved: "
        f"{total} generated tokens measured"
    )
    for w in run.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if args.out:
        write(doc, Path(args.out))
        print(f"wrote {args.out}/results.json, report.md and plots")
    return 1 if args.strict and run.warnings else 0


def _bench_endpoint(args: argparse.Namespace) -> int:
    import asyncio

    from trimode import __version__
    from trimode.bench.endpoint import ENDPOINT_MODES, bench_endpoint, endpoint_configs
    from trimode.bench.machine import client_card
    from trimode.bench.report import table, write
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
    blocks: list[int | None] = list(_int_list("--block-lengths", args.block_lengths)) if args.block_lengths else [None]
    thresholds: list[float | None] = list(_float_list("--thresholds", args.thresholds)) if args.thresholds else [None]
    specs: list[str | None] = list(_spec_list(args.spec)) if args.spec else [None]
    concurrency = _int_list("--concurrency", args.concurrency or "1,8,32")
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
    for w in run.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if args.out:
        write(doc, Path(args.out))
        print(f"wrote {args.out}/results.json, report.md and plots")
    return 1 if failed or (args.strict and run.warnings) else 0


def _api_key(args: argparse.Namespace) -> str | None:
    """--api-key-file, else TRIMODE_API_KEY, else --api-key (visible to every local user in ps)."""
    if args.api_key and args.api_key_file:
        raise ValueError("give --api-key or --api-key-file, not both")
    if args.api_key_file:
        key = Path(args.api_key_file).read_text().strip()
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file} is empty")
        return key
    if args.api_key:
        print(
            "note: a key given with --api-key is readable by any local user (ps, /proc/PID/cmdline); "
            "prefer TRIMODE_API_KEY or --api-key-file",
            file=sys.stderr,
        )
        return args.api_key
    return os.environ.get(API_KEY_ENV) or None


def _serve(args: argparse.Namespace) -> int:
    import logging

    from trimode.hub import is_hub_id, resolve_model
    from trimode.sampling_params import SamplingParams
    from trimode.server.app import build_app
    from trimode.server.async_engine import AsyncEngine
    from trimode.server.http_server import serve
    from trimode.server.tool_parsers import tool_parser

    SamplingParams(mode=args.default_mode)  # validates the mode with the usual message
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser NAME (mistral or hermes)")
    parser = tool_parser(args.tool_call_parser) if args.tool_call_parser is not None else None
    for flag, value in (
        ("--shutdown-timeout", args.shutdown_timeout),
        ("--read-timeout", args.read_timeout),
        ("--max-connections", args.max_connections),
        ("--max-logprob-entries", args.max_logprob_entries),
        ("--kv-cache-tokens", args.kv_cache_tokens),
        ("--kv-page-size", args.kv_page_size),
    ):
        if not value > 0:
            raise ValueError(f"{flag} must be > 0; got {value}")
    api_key = _api_key(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("trimode.access").disabled = not args.access_log
    if args.max_model_len is not None and args.max_model_len < 1:
        raise ValueError(f"--max-model-len must be >= 1; got {args.max_model_len}")
    if args.model_path is not None and args.model not in (None, args.model_path):
        raise ValueError(f"give the model once: as MODEL ({args.model_path}) or --model ({args.model}), not both")
    args.model = args.model or args.model_path
    if args.model is not None and is_hub_id(args.model):  # served under the id, read from its snapshot
        args.served_model_name = args.served_model_name or [args.model]
        args.model, args.revision = str(resolve_model(args.model, args.revision)), None
    defaults = _generation_defaults(args.generation_config, args.model)
    llm = _load_llm(args, max_model_len=args.max_model_len)
    if args.chat_template is not None:
        llm.tokenizer.set_chat_template(_chat_template(args.chat_template))
    names = args.served_model_name or [Path(args.model).name if args.model else "trimode-embedded"]
    engine = AsyncEngine(
        llm.engine(
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            kv_cache_tokens=args.kv_cache_tokens,
            page_size=args.kv_page_size,
            max_num_batched_tokens=args.max_num_batched_tokens,
        ),
        max_queue=args.max_queue,
    )
    engine.start()
    app = build_app(
        engine,
        names,
        api_key=api_key,
        default_mode=args.default_mode,
        access_log=args.access_log,
        docs=args.docs,
        seed=args.seed,
        generation_defaults=defaults,
        max_logprob_entries=args.max_logprob_entries,
        tool_parser=parser,
        auto_tool_choice=args.enable_auto_tool_choice,
    )
    name = names[0]

    def stop() -> None:  # the engine thread, then the tensor-parallel workers; safe to call twice
        engine.shutdown()
        llm.close()

    banner = f"serving {name} on http://{args.host}:{{port}}/v1 (default mode {args.default_mode})"
    try:
        serve(
            app,
            engine,
            args.host,
            args.port,
            banner,
            shutdown_timeout=args.shutdown_timeout,
            max_connections=args.max_connections,
            read_timeout=args.read_timeout,
            has_api_key=api_key is not None,
            on_stopped=stop,
        )
    finally:
        stop()
    return 0


def _structured_flag(value: str | None) -> str | None:
    """--structured: SamplingParams.structured as JSON, checked here (bad input is one line, exit 2)."""
    if value is None:
        return None
    from trimode.structured import check_spec

    try:
        check_spec(json.loads(value))
    except json.JSONDecodeError as e:
        raise ValueError(f'--structured must be JSON such as \'{{"regex": "[0-9 ]+"}}\'; got {value!r}: {e}') from e
    return value


def _chat_template(value: str) -> str:
    """--chat-template: a file holding the template, or the template itself (as vllm serve takes it)."""
    path = Path(value)
    if path.is_file():
        return path.read_text()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template {value}: no such file, and not a Jinja template either")


# generation_config.json's sampling fields -> SamplingParams' names.
GENERATION_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "max_new_tokens": "max_tokens"}


def _generation_defaults(value: str, model: str | None) -> dict[str, Any] | None:
    """--generation-config: "auto" takes the sampling defaults of the model's generation_config.json,
    "vllm" none (OpenAI's), or a directory holding a generation_config.json."""
    from trimode.llm import EMBEDDED_MODEL_DIR
    from trimode.sampling_params import SamplingParams

    if value == "vllm":
        return None
    folder = Path(model) if model else EMBEDDED_MODEL_DIR
    if value != "auto":
        folder = Path(value)
        if not (folder / "generation_config.json").is_file():
            raise ValueError(f"--generation-config {value}: no generation_config.json there (or give auto or vllm)")
    file = folder / "generation_config.json"
    if not file.is_file():
        return None
    config = json.loads(file.read_text())
    defaults = {ours: config[theirs] for theirs, ours in GENERATION_FIELDS.items() if config.get(theirs) is not None}
    try:
        SamplingParams(**defaults)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from e
    return defaults


def _add_model_shape_flags(p: argparse.ArgumentParser, preset_required: bool) -> None:
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


# `trimode train`'s TrainConfig flags: type and what each sets (the defaults are TrainConfig's).
TRAIN_FLAGS: dict[str, tuple[type, str]] = {
    "steps": (int, "optimizer steps in all"),
    "ar-steps": (int, "first steps with the AR loss alone (stage one), before the joint objective"),
    "batch-size": (int, "sequences per micro-batch"),
    "grad-accum": (int, "micro-batches per optimizer step"),
    "seq-len": (int, "tokens per training sequence"),
    "lr": (float, "peak learning rate (AdamW)"),
    "min-lr-ratio": (float, "the schedule's floor, as a fraction of --lr"),
    "warmup-steps": (int, "steps of linear warmup"),
    "schedule": (str, "cosine, or wsd (warmup, stable, then linear decay over the last 20%%)"),
    "weight-decay": (float, "AdamW weight decay"),
    "grad-clip": (float, "gradient norm clipping"),
    "alpha": (float, "weight of the diffusion loss in L = L_AR + alpha * L_diff"),
    "block-size": (int, "diffusion block length the model learns to denoise"),
    "masking": (str, "position (Efficient-DLM: few masks sit at the block's end) or uniform"),
    "half-life-ratio": (float, "position masking's half-life, as a fraction of the block"),
    "eval-every": (int, "steps between quick task evals; 0 evaluates only at the end"),
    "eval-examples": (int, "examples per task and mode in each quick eval"),
    "save-every": (int, "steps between checkpoints"),
    "keep": (int, "checkpoints kept besides the latest"),
    "seed": (int, "seed of the data order, masks and initialisation"),
    "device": (str, "auto, cpu or cuda"),
    "autocast": (str, "auto (bf16 on CUDA, off on a CPU), bf16 or off"),
    "save-dtype": (str, "dtype of saved checkpoints: float32, bfloat16 or float16"),
    "tp": (int, "tensor-parallel ranks per model replica, under torchrun"),
}


def build_parser() -> argparse.ArgumentParser:
    from trimode.train.trainer import TrainConfig

    parser = argparse.ArgumentParser(prog="trimode", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text in one of the three modes")
    g.add_argument("prompts", nargs="+", metavar="PROMPT")
    _add_model_flags(g)
    g.add_argument("--mode", default="ar", help=f"one of {', '.join(REQUEST_MODES)} (default ar)")
    g.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most per prompt (default 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default); up to 2")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep this much probability (default 1)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens; 0 keeps all (the default)")
    g.add_argument("--seed", type=int, help="seed of a sampled answer (default: a random one)")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="generate max_tokens even past EOS (benchmarks)")
    g.add_argument("--block-length", type=int, default=32, help="block length of diffusion and selfspec (default 32)")
    g.add_argument("--spec", default="linear", help=SPEC_HELP)
    g.add_argument("--threshold", type=_threshold, default=0.9, help=THRESHOLD_HELP)
    g.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    g.set_defaults(func=_generate)

    c = sub.add_parser("chat", help="chat in the terminal, each answer streamed as it is decoded")
    _add_model_flags(c)
    c.add_argument("--mode", default="ar", help=f"one of {', '.join(REQUEST_MODES)} (default ar)")
    c.add_argument("--max-tokens", type=int, default=256, help="tokens per answer at most (default 256)")
    c.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default)")
    c.add_argument("--seed", type=int, help="seed of sampled answers")
    c.add_argument("--block-length", type=int, default=32, help="block length of diffusion and selfspec")
    c.add_argument("--system", help="a system message to start the conversation with")
    c.set_defaults(func=_chat)

    m = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint in the release's format")
    _add_model_shape_flags(m, preset_required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--dtype", default="bfloat16", help="float32, bfloat16 (the release's) or float16")
    m.add_argument("--draft-lora-rank", type=int, default=0, help="also write a random draft LoRA of this rank")
    m.add_argument("--shard-gb", type=float, default=5.0, help="shard the weights past this many GiB")
    m.set_defaults(func=_make_checkpoint)

    tt = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer with the special tokens")
    tt.add_argument("--out", required=True)
    tt.add_argument("--vocab", type=int, default=4096)
    tt.add_argument("--data", default="stdlib,tasks", help="sources, as for train")
    tt.add_argument("--no-split-digits", action="store_true", help="let BPE merge digits")
    tt.add_argument("--max-length", type=int, default=262144, help="model_max_length in tokenizer_config.json")
    tt.set_defaults(func=_train_tokenizer)

    t = sub.add_parser("train", help="train a tri-mode model (joint AR + diffusion objective)")
    t.add_argument("--out", required=True, help="run directory: checkpoints, latest, log.jsonl")
    t.add_argument("--data", help="NAME[:WEIGHT],...: stdlib, tasks, or paths (text, dirs, JSONL)")
    _add_model_shape_flags(t, preset_required=False)
    t.add_argument("--init", help="start from an NLD checkpoint or a HF Mistral/Ministral-3/Llama causal LM")
    t.add_argument("--mask-token-id", type=int, default=100, help="mask id when converting a HF causal LM")
    t.add_argument("--tokenizer", help="tokenizer directory (default: the --init one, else one trained here)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/latest exactly")
    t.add_argument("--stop-at", type=int, help="end this run after step N with a checkpoint (resume later)")
    for name, (kind, text) in TRAIN_FLAGS.items():
        default = TrainConfig.__dataclass_fields__[name.replace("-", "_")].default
        t.add_argument(f"--{name}", type=kind, help=f"{text} (default {default})")
    t.add_argument(
        "--activation-checkpointing",
        action="store_const",
        const=True,
        help="recompute each decoder layer's activations in the backward pass (less memory, ~1/3 more compute)",
    )
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="task accuracy per mode, tokens per forward, held-out stdlib loss")
    _add_model_flags(e)
    e.add_argument("--modes", default="ar,diffusion,selfspec")
    e.add_argument("--suite", default="tasks")
    e.add_argument("--num-examples", type=int, default=100, help="held-out examples per task")
    e.add_argument("--block-length", type=int, default=32)
    e.add_argument("--spec", default="linear", help=SPEC_HELP)
    e.add_argument("--threshold", type=_threshold, default=0.9, help=THRESHOLD_HELP)
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=_eval)

    b = sub.add_parser("bench", help="tokens/s, tokens per forward, latency and accuracy per mode and batch size")
    _add_model_flags(b)
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
    b.add_argument("--thresholds", help="default 0.9 offline; the server's default over HTTP")
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
    b.set_defaults(func=_bench)

    v = sub.add_parser("serve", help="OpenAI-compatible server: every request picks its mode")
    v.add_argument(
        "model_path", nargs="?", metavar="MODEL", help="checkpoint directory or hub id (the same as --model)"
    )
    _add_model_flags(v)
    v.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument(
        "--api-key",
        help=f"require `Authorization: Bearer KEY` on /v1/* (prefer ${API_KEY_ENV} or "
        "--api-key-file: a command-line key is visible to other local users)",
    )
    v.add_argument("--api-key-file", help="read the API key from this file")
    v.add_argument("--max-batch", type=int, default=32, help="requests decoding at once")
    v.add_argument("--max-queue", type=int, default=256, help="requests waiting; more are refused with 429")
    v.add_argument(
        "--kv-cache-tokens",
        "--max-kv-tokens",
        type=int,
        default=65536,
        help="KV slots in the pool shared by all requests, allocated at start (its bytes are printed)",
    )
    v.add_argument("--kv-page-size", type=int, default=PAGE_SIZE, help="KV slots per page of the pool")
    v.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=512,
        help="prompt tokens one prefill step feeds; longer prompts are prefilled in chunks of this many",
    )
    v.add_argument(
        "--max-model-len", type=int, help="longest prompt + max_tokens a request may ask for (default: the model's)"
    )
    v.add_argument("--default-mode", default="ar", help=f"mode of requests that name none: {', '.join(REQUEST_MODES)}")
    v.add_argument(
        "--served-model-name",
        nargs="+",
        help="the names clients may send as `model`; responses carry the first (default: the directory name)",
    )
    v.add_argument("--chat-template", help="a chat template (Jinja) file, or the template itself, to use instead")
    v.add_argument(
        "--generation-config",
        default="auto",
        help="sampling defaults for what requests leave unset: auto (the model's generation_config.json), vllm "
        "(none: temperature 1, top_p 1, max_tokens 128) or a directory holding a generation_config.json",
    )
    v.add_argument("--seed", type=int, help="seed the seeds of requests that give none: a rerun samples the same")
    v.add_argument(
        "--shutdown-timeout",
        type=float,
        default=5.0,
        help="on SIGTERM/SIGINT, seconds running requests get to finish (a second signal exits now)",
    )
    v.add_argument("--max-connections", type=int, default=512, help="open connections; more get 503 at once")
    v.add_argument(
        "--read-timeout",
        type=float,
        default=30.0,
        help="seconds a client has to send its whole request (head and body)",
    )
    v.add_argument(
        "--max-logprob-entries",
        type=int,
        default=MAX_LOGPROB_ENTRIES,
        help="log-probabilities one request may ask for: n x the sum over its prompts of (prompt tokens with "
        f"echo + max_tokens) x (logprobs + 1); more is refused with 400 (default {MAX_LOGPROB_ENTRIES:,})",
    )
    v.add_argument(
        "--tool-call-parser",
        help="the model's tool-call format (mistral: NLD's and Ministral's; hermes: <tool_call> JSON): "
        "tool_choice 'required' or a named function then forces a valid call with a grammar",
    )
    v.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="also read tool calls out of answers under tool_choice 'auto' (needs --tool-call-parser)",
    )
    v.add_argument("--access-log", action="store_true", help="log one line per request (never the prompt)")
    v.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json")
    v.set_defaults(func=_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"trimode {args.command}: error: {e}", file=sys.stderr)
        return 2
