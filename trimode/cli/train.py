"""`trimode train-tokenizer` and `trimode train`: the training recipe from the command line (its
TrainConfig flags generated from the dataclass, with its defaults)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from trimode.cli.common import (
    add_model_shape_flags,
    model_config_from_args,
)

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


def run_tokenizer(args: argparse.Namespace) -> int:
    from trimode.tokenizer_build import build_tokenizer, write_tokenizer_files
    from trimode.train.data import corpus_texts

    tok = build_tokenizer(args.vocab, corpus_texts(args.data), split_digits=not args.no_split_digits)
    write_tokenizer_files(tok, args.out, args.max_length)
    print(f"wrote a {tok.get_vocab_size()}-token byte-level BPE tokenizer to {args.out}")
    return 0


def run(args: argparse.Namespace) -> int:
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
    model_cfg = None if args.init else model_config_from_args(args, vocab)
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


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from trimode.train.trainer import TrainConfig

    tt = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer with the special tokens")
    tt.add_argument("--out", required=True)
    tt.add_argument("--vocab", type=int, default=4096)
    tt.add_argument("--data", default="stdlib,tasks", help="sources, as for train")
    tt.add_argument("--no-split-digits", action="store_true", help="let BPE merge digits")
    tt.add_argument("--max-length", type=int, default=262144, help="model_max_length in tokenizer_config.json")
    tt.set_defaults(func=run_tokenizer)

    t = sub.add_parser("train", help="train a tri-mode model (joint AR + diffusion objective)")
    t.add_argument("--out", required=True, help="run directory: checkpoints, latest, log.jsonl")
    t.add_argument("--data", help="NAME[:WEIGHT],...: stdlib, tasks, or paths (text, dirs, JSONL)")
    add_model_shape_flags(t, preset_required=False)
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
    t.set_defaults(func=run)
