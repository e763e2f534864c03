"""Why LLMEngine runs one pass per mode group rather than one merged batch with per-row masks.

With n running requests of each mode (block length B, a P-token prefix each), one engine step gives
every request one step of its own mode:
  grouped (what the engine does): AR (n, 1) + denoise (n, B) + draft (n, B) + verify (n, B+1),
  four forwards whose query lengths fit their rows;
  merged: one batch of 3n rows, every row padded to the widest query (B+1) and masked per row. A
  self-spec cycle still needs a draft pass and then a verify pass, so a cycle takes two merged
  forwards, in which AR rows advance two tokens and diffusion rows two denoise passes.
The forwards are timed on the real model (median of repeats), and each design's output tokens/s is
derived from them and from the tokens each step commits (measured in `trimode bench`): AR 1 per
step, diffusion TOKENS_PER_DENOISE per pass, self-spec TOKENS_PER_CYCLE per cycle.

Usage: python scripts/grouped_vs_merged.py [MODEL_DIR ("" for the embedded model)] [TOKENS_PER_DENOISE]
    [TOKENS_PER_CYCLE]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from trimode import LLM

BLOCK, PREFIX, REPEATS = 32, 64, 15


def forward_ms(llm: LLM, rows: int, width: int, causal: bool, lora: bool = False) -> float:
    """Median ms of one forward of `width` new tokens per row after a PREFIX-token prefix."""
    runner = llm.runner
    kv = runner.new_cache(rows, PREFIX + width + 1)
    runner.forward(kv, torch.randint(200, 1000, (rows, PREFIX)), causal=True)
    kv.commit()
    tokens = torch.randint(200, 1000, (rows, width))
    times = []
    for _ in range(REPEATS + 2):  # two warm-up runs; scratch writes are never committed
        t0 = time.perf_counter()
        runner.forward(kv, tokens, causal=causal, use_draft_lora=lora)
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times[2:])


def main() -> None:
    llm = LLM(model=sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else None)
    per_denoise = float(sys.argv[2]) if len(sys.argv) > 2 else 4.0
    per_cycle = float(sys.argv[3]) if len(sys.argv) > 3 else 9.0
    torch.manual_seed(0)
    print(
        f"threads {torch.get_num_threads()}, block {BLOCK}, prefix {PREFIX}, tokens per denoise pass "
        f"{per_denoise}, per self-spec cycle {per_cycle}"
    )
    print(
        "| requests per mode | grouped step ms (AR + denoise + draft + verify) | merged forward ms (3n x B+1) | "
        "grouped tokens/s | merged tokens/s | merged / grouped |"
    )
    print("|---|---|---|---|---|---|")
    for n in (1, 4, 8, 16):
        ar = forward_ms(llm, n, 1, causal=True)
        denoise = forward_ms(llm, n, BLOCK, causal=False)
        draft = forward_ms(llm, n, BLOCK, causal=False, lora=True)
        verify = forward_ms(llm, n, BLOCK + 1, causal=True)
        # Per-row masks cost what one kind does; the draft LoRA runs on every row and is kept on draft rows.
        merged = forward_ms(llm, 3 * n, BLOCK + 1, causal=False, lora=True)
        grouped_step = ar + denoise + draft + verify
        grouped_tps = n * (1 + per_denoise + per_cycle) / grouped_step * 1000
        merged_tps = n * (2 + 2 * per_denoise + per_cycle) / (2 * merged) * 1000
        print(
            f"| {n} | {grouped_step:.1f} ({ar:.1f} + {denoise:.1f} + {draft:.1f} + {verify:.1f}) | {merged:.1f} | "
            f"{grouped_tps:.0f} | {merged_tps:.0f} | {merged_tps / grouped_tps:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
