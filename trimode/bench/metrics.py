"""Summary statistics of one benchmark configuration."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Hashable
from typing import Any

from trimode.outputs import GenerationOutput


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); nan for no values."""
    xs = sorted(v for v in values if not math.isnan(v))
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency(values: list[float]) -> dict[str, float]:
    return {f"p{q}": round(1000 * percentile(values, q), 3) for q in (50, 90, 99)}


def summarize(
    outputs: list[GenerationOutput], correct: list[bool | None], wall_seconds: float, forward_ms: list[dict[str, float]]
) -> dict[str, Any]:
    """Figures of one (mode, batch size, block, threshold) run. Tokens per forward counts every
    forward each request took part in, its prefill included."""
    tokens = sum(o.num_generated_tokens for o in outputs)
    forwards = sum(o.num_forwards for o in outputs)
    checked = [c for c in correct if c is not None]
    kinds: dict[str, list[float]] = {}
    for batch in forward_ms:
        for kind, ms in batch.items():
            kinds.setdefault(kind, []).append(ms)
    result: dict[str, Any] = {
        "num_requests": len(outputs),
        "num_generated_tokens": tokens,
        "num_forwards": forwards,
        "seconds": round(wall_seconds, 4),
        "output_tokens_per_s": round(tokens / wall_seconds, 2),
        "requests_per_s": round(len(outputs) / wall_seconds, 3),
        "tokens_per_forward": round(tokens / max(forwards, 1), 4),
        "ttft_ms": latency([o.time_to_first_token for o in outputs]),
        "itl_ms": latency([o.inter_token_latency for o in outputs]),
        "forward_ms": {k: round(sum(v) / len(v), 3) for k, v in kinds.items()},
        "accuracy": round(sum(checked) / len(checked), 4) if checked else None,
        "num_checked": len(checked),
    }
    cycles = [c for o in outputs for c in o.mode_stats.get("tokens_per_cycle", [])]
    if cycles:
        result["tokens_per_cycle"] = round(sum(cycles) / len(cycles), 4)  # the vendor's "acceptance length"
        result["acceptance_histogram"] = dict(sorted(Counter(cycles).items()))
    passes = [p for o in outputs for p in o.mode_stats.get("denoise_passes_per_block", [])]
    if passes:
        result["denoise_passes_per_block"] = round(sum(passes) / len(passes), 4)
    return result


def is_ar(r: dict[str, Any]) -> bool:
    """Whether a result is the AR reference of its load (plain: no A/A copy, baseline or logprobs)."""
    plain = not r.get("control") and r.get("logprobs") is None and r.get("structured") is None
    return r["mode"] == "ar" and plain and r.get("engine", "trimode") == "trimode"


def add_speedup_vs_ar(results: list[dict[str, Any]], key: Callable[[dict[str, Any]], Hashable]) -> None:
    """Each result's tokens/s over AR's at the same `key` (offline: batch size and context length;
    over HTTP: concurrency) in the same run (trimode AR's own measurement: not its A/A control copy,
    nor a baseline engine)."""
    ar = {key(r): r["output_tokens_per_s"] for r in results if is_ar(r)}
    for r in results:
        base = ar.get(key(r))
        r["speedup_vs_ar"] = round(r["output_tokens_per_s"] / base, 3) if base else None
