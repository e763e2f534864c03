"""`trimode generate | make-checkpoint`. Bad input prints one line (no traceback) and exits 2."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from trimode.sampling_params import MODES


def _generate(args: argparse.Namespace) -> int:
    from trimode.llm import LLM
    from trimode.sampling_params import SamplingParams

    params = SamplingParams(mode=args.mode, max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop,
                            ignore_eos=args.ignore_eos, block_length=args.block_length, threshold=args.threshold)
    llm = LLM(model=args.model, dtype=args.dtype, device=args.device)
    start = time.perf_counter()
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params)
    else:
        outputs = llm.generate(args.prompts, params)
    seconds = time.perf_counter() - start
    for out in outputs:
        if args.json:
            print(json.dumps(out.summary()))
        else:
            print(out.text)
            print(f"[{out.mode}: {out.num_generated_tokens} tokens, {out.num_forwards} forwards, "
                  f"{out.tokens_per_forward:.2f} tokens/forward, finish={out.finish_reason}]", file=sys.stderr)
    total = sum(o.num_generated_tokens for o in outputs)
    print(f"[{len(outputs)} prompts, {total} tokens in {seconds:.3f}s: {total / seconds:.1f} tokens/s]",
          file=sys.stderr)
    return 0


def _make_checkpoint(args: argparse.Namespace) -> int:
    from trimode.checkpoint import make_checkpoint, preset_config

    overrides = {k: v for k, v in (("intermediate_size", args.intermediate), ("head_dim", args.head_dim),
                                   ("num_attention_heads", args.heads), ("num_key_value_heads", args.kv_heads))
                 if v is not None}
    cfg = preset_config(args.preset, layers=args.layers, hidden=args.hidden, vocab=args.vocab, **overrides)
    out = make_checkpoint(cfg, args.out, seed=args.seed, dtype=args.dtype, draft_lora_rank=args.draft_lora_rank,
                          shard_bytes=int(args.shard_gb * 2**30))
    print(f"wrote {args.preset} checkpoint ({cfg.num_parameters / 1e6:.1f}M parameters) to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trimode", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text in one of the three modes")
    g.add_argument("prompts", nargs="+", metavar="PROMPT")
    g.add_argument("--model", help="checkpoint directory (Hugging Face layout)")
    g.add_argument("--mode", default="ar", help=f"one of {', '.join(MODES)} (default ar)")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="generate max_tokens even past EOS (benchmarks)")
    g.add_argument("--block-length", type=int, default=32)
    g.add_argument("--threshold", type=float, default=0.9)
    g.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    g.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.set_defaults(func=_generate)

    m = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint in the release's format")
    m.add_argument("--preset", required=True, help="nld-3b, nld-8b, nld-14b or tiny")
    m.add_argument("--out", required=True)
    m.add_argument("--layers", type=int)
    m.add_argument("--hidden", type=int)
    m.add_argument("--vocab", type=int)
    m.add_argument("--intermediate", type=int)
    m.add_argument("--heads", type=int)
    m.add_argument("--kv-heads", type=int)
    m.add_argument("--head-dim", type=int)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--dtype", default="bfloat16", help="float32, bfloat16 (the release's) or float16")
    m.add_argument("--draft-lora-rank", type=int, default=0, help="also write a random draft LoRA of this rank")
    m.add_argument("--shard-gb", type=float, default=5.0, help="shard the weights past this many GiB")
    m.set_defaults(func=_make_checkpoint)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"trimode {args.command}: error: {e}", file=sys.stderr)
        return 2
