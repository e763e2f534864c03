"""Peak host memory of decoding at a large vocabulary: a random checkpoint of the tiny preset with
the real models' vocabulary (131,072; its weights are some 70 MB, so the logits dominate), a batch
of requests decoded by the engine at a given block length and token budget, greedy or sampled.

Usage: python scripts/logits_memory.py [--batch 64] [--block 32] [--vocab 131072]
       [--budget 512] [--temperature 0] [--mode selfspec]

Prints the growth of the process's peak resident memory over one request alone (which covers
the weights and one-row passes), i.e. what the batch's steps add. CPU only: on CUDA the same
passes would be read from torch.cuda.max_memory_allocated."""

from __future__ import annotations

import argparse
import dataclasses
import resource
import tempfile
from pathlib import Path

from trimode import LLM, SamplingParams
from trimode.checkpoint import make_checkpoint, preset_config


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def decode(llm: LLM, n: int, params: SamplingParams, budget: int) -> None:
    engine = llm.engine(max_batch=n, max_queue=n, kv_cache_tokens=n * 256, max_num_batched_tokens=budget)
    for i in range(n):
        engine.add_tokenized(str(i), [llm.config.bos_token_id] + [5 + i] * 20, params, None, name=str(i))
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.error is not None:
                raise RuntimeError(out.error)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=131072)
    ap.add_argument("--budget", type=int, default=512, help="--max-num-batched-tokens of the engine")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--mode", default="selfspec", choices=["ar", "diffusion", "selfspec"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dataclasses.replace(preset_config("tiny"), vocab_size=args.vocab)
        path = make_checkpoint(cfg, Path(tmp), seed=0, dtype="float32", draft_lora_rank=8)
        llm = LLM(path, dtype="float32", device="cpu", compile=False)
        params = SamplingParams(
            mode=args.mode,
            max_tokens=args.block + 1,
            block_length=args.block,
            ignore_eos=True,
            temperature=args.temperature,
            seed=0,
        )
        decode(llm, 1, params, args.budget)
        alone = peak_gib()
        decode(llm, args.batch, params, args.budget)
        print(
            f"{args.mode} batch {args.batch} block {args.block} vocab {args.vocab} budget {args.budget} "
            f"temperature {args.temperature}: peak memory +{peak_gib() - alone:.2f} GiB over one request"
        )


if __name__ == "__main__":
    main()
