"""`trimode generate`: answers to prompts in one mode, each with its forwards and tokens per forward."""

from __future__ import annotations

import argparse
import json
import sys
import time

from trimode.cli.common import (
    add_mode_flags,
    add_model_flags,
    load_llm,
    mode_knobs,
)
from trimode.sampling_params import REQUEST_MODES


def run(args: argparse.Namespace) -> int:
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
        **mode_knobs(args),
    )
    llm = load_llm(args)
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


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    g = sub.add_parser("generate", help="generate text in one of the three modes")
    g.add_argument("prompts", nargs="+", metavar="PROMPT")
    add_model_flags(g)
    g.add_argument("--mode", default="ar", help=f"one of {', '.join(REQUEST_MODES)} (default ar)")
    g.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most per prompt (default 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default); up to 2")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep this much probability (default 1)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens; 0 keeps all (the default)")
    g.add_argument("--seed", type=int, help="seed of a sampled answer (default: a random one)")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="generate max_tokens even past EOS (benchmarks)")
    add_mode_flags(g)
    g.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    g.set_defaults(func=run)
