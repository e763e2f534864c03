"""`trimode make-checkpoint`: a random-weight checkpoint in the release's exact format."""

from __future__ import annotations

import argparse

from trimode.cli.common import (
    add_model_shape_flags,
    model_config_from_args,
)


def run(args: argparse.Namespace) -> int:
    from trimode.checkpoint import make_checkpoint

    cfg = model_config_from_args(args, None)
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


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    m = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint in the release's format")
    add_model_shape_flags(m, preset_required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--dtype", default="bfloat16", help="float32, bfloat16 (the release's) or float16")
    m.add_argument("--draft-lora-rank", type=int, default=0, help="also write a random draft LoRA of this rank")
    m.add_argument("--shard-gb", type=float, default=5.0, help="shard the weights past this many GiB")
    m.set_defaults(func=run)
