"""trimode: NVIDIA's Nemotron-Labs-Diffusion models in all three decoding modes (ar, diffusion,
selfspec). Commands: generate, chat, serve, bench, eval, train, train-tokenizer, make-checkpoint;
each takes --help. Bad input prints one line (no traceback) and exits 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from trimode.cli import bench, chat, checkpoint, evaluate, generate, serve, train

COMMANDS = (generate, chat, checkpoint, train, evaluate, bench, serve)  # in --help's order


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trimode", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"trimode {args.command}: error: {e}", file=sys.stderr)
        return 2
