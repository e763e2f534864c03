"""Which attention kernel for passes over rows of different cache lengths, on this machine:
SDPA with a (B, 1, T, S) bool mask (what trimode runs) against FlexAttention compiled with a block
mask built from the per-row lengths (mask as data), and SDPA with no mask (a lower bound: rows of one
length need none). The embedded model's heads (4 query, 2 KV, head dim 64), batch 16, fp32.

Usage: python scripts/attention_kernels.py
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

B, H, H_KV, D = 16, 4, 2, 64
SHAPES = [(256, 33), (4096, 33), (4096, 8), (4096, 1)]  # (keys S, new tokens T): verify, denoise, AR


def mean_ms(fn, repeats: int = 10) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1000 * (time.perf_counter() - start) / repeats


def measure(flex, s: int, t: int) -> tuple[str, float]:
    """One table row for S keys and T new tokens, and the first (compiling) flex call's seconds."""
    q, k, v = torch.randn(B, H, t, D), torch.randn(B, H_KV, s, D), torch.randn(B, H_KV, s, D)
    lengths = torch.randint(s // 2, s - t, (B,))

    def dense_mask() -> torch.Tensor:
        return (torch.arange(s)[None, None] < (lengths[:, None] + torch.arange(1, t + 1))[:, :, None])[:, None]

    def causal(b, h, qi, kv):
        return kv < lengths[b] + qi + 1

    mask = dense_mask()
    block_mask = create_block_mask(causal, B, None, t, s, device="cpu")
    compile_start = time.perf_counter()
    flex(q, k, v, block_mask=block_mask, enable_gqa=True)
    compiled = time.perf_counter() - compile_start
    sdpa = mean_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))
    build = mean_ms(dense_mask)
    flexed = mean_ms(lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True))
    block_build = mean_ms(lambda: create_block_mask(causal, B, None, t, s, device="cpu"))
    bare = mean_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    return f"| {s} | {t} | {sdpa:.2f} | {build:.2f} | {flexed:.2f} | {block_build:.2f} | {bare:.2f} |", compiled


def main() -> None:
    warnings.filterwarnings("ignore")
    flex = torch.compile(flex_attention, dynamic=True)
    measured = [measure(flex, s, t) for s, t in SHAPES]
    columns = ["S keys", "T new", "SDPA + bool mask ms", "mask build ms", "flex compiled ms", "block mask build ms"]
    print("| " + " | ".join([*columns, "SDPA no mask ms"]) + " |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(row for row, _ in measured))
    print("first flex call per shape (compiling):", ", ".join(f"{c:.1f} s" for _, c in measured))


if __name__ == "__main__":
    main()
