"""The report: a table on stdout, results.json, report.md and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COLUMNS = (("config", 22), ("tok/s", 9), ("req/s", 7), ("TPF", 6), ("tok/cycle", 9), ("passes/blk", 10),
           ("TTFT p50", 9), ("ITL p50", 8), ("acc", 6), ("vs AR", 6))


def _label(r: dict[str, Any]) -> str:
    parts = [r["mode"], f"bs{r['batch_size']}"]
    if r.get("block_length") is not None:
        parts.append(f"B{r['block_length']}")
    if r.get("threshold") is not None:
        parts.append(f"t{r['threshold']:g}")
    return " ".join(parts)


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(results: list[dict[str, Any]]) -> str:
    lines = ["  ".join(name.rjust(w) for name, w in COLUMNS)]
    for r in results:
        cells = (_label(r), _fmt(r["output_tokens_per_s"], ".1f"), _fmt(r["requests_per_s"], ".2f"),
                 _fmt(r["tokens_per_forward"], ".2f"), _fmt(r.get("tokens_per_cycle"), ".2f"),
                 _fmt(r.get("denoise_passes_per_block"), ".2f"), _fmt(r["ttft_ms"]["p50"], ".1f"),
                 _fmt(r["itl_ms"]["p50"], ".2f"), _fmt(r["accuracy"], ".3f"), _fmt(r.get("speedup_vs_ar"), ".2f"))
        lines.append("  ".join(c.rjust(w) for c, (_, w) in zip(cells, COLUMNS)))
    return "\n".join(lines)


def markdown(doc: dict[str, Any]) -> str:
    head = ["config", "tokens/s", "requests/s", "tokens/forward", "tokens/cycle", "denoise passes/block",
            "TTFT p50/p99 ms", "ITL p50/p99 ms", "accuracy", "speed-up vs AR", "forward ms"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in doc["results"]:
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in r["forward_ms"].items())
        rows.append("| " + " | ".join([
            _label(r), _fmt(r["output_tokens_per_s"], ".1f"), _fmt(r["requests_per_s"], ".2f"),
            _fmt(r["tokens_per_forward"], ".2f"), _fmt(r.get("tokens_per_cycle"), ".2f"),
            _fmt(r.get("denoise_passes_per_block"), ".2f"), f"{r['ttft_ms']['p50']:.1f} / {r['ttft_ms']['p99']:.1f}",
            f"{r['itl_ms']['p50']:.2f} / {r['itl_ms']['p99']:.2f}", _fmt(r["accuracy"], ".3f"),
            _fmt(r.get("speedup_vs_ar"), ".2f"), kinds]) + " |")
    card = "\n".join(f"- {k}: {v}" for k, v in doc["machine"].items())
    parts = [f"# trimode bench\n\nCommand: `{doc['command']}`\n", f"## Machine\n\n{card}\n",
             f"## Results ({doc['num_prompts']} prompts, suite `{doc['suite']}`, max_tokens {doc['max_tokens']}, "
             f"warm-up {doc['warmup']} batches excluded)\n", "\n".join(rows) + "\n"]
    if doc.get("baseline"):
        parts.append("## Hugging Face baseline\n\n" + "\n".join(f"- {k}: {v}" for k, v in doc["baseline"].items()))
    if doc.get("crossover"):
        parts.append(f"\n## Crossover\n\n{doc['crossover']}\n")
    return "\n".join(parts) + "\n"


def crossover(results: list[dict[str, Any]]) -> str | None:
    """The smallest batch size at which AR's tokens/s beats every selfspec configuration."""
    sizes = sorted({r["batch_size"] for r in results})
    best = {bs: max((r["output_tokens_per_s"] for r in results if r["mode"] == "selfspec" and r["batch_size"] == bs),
                    default=None) for bs in sizes}
    ar = {r["batch_size"]: r["output_tokens_per_s"] for r in results if r["mode"] == "ar"}
    if not ar or all(v is None for v in best.values()):
        return None
    for bs in sizes:
        if best[bs] is not None and bs in ar and ar[bs] > best[bs]:
            return f"AR overtakes selfspec at batch size {bs} ({ar[bs]:.1f} vs {best[bs]:.1f} tokens/s)"
    return f"selfspec stays ahead of AR up to batch size {sizes[-1]}"


def plots(results: list[dict[str, Any]], out: Path) -> list[str]:
    try:
        import matplotlib
    except ImportError as e:
        raise ValueError("--out writes plots with matplotlib: pip install 'trimode[bench]'") from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    series: dict[str, list[tuple[int, float]]] = {}
    for r in results:
        key = _label(r).replace(f" bs{r['batch_size']}", "")
        series.setdefault(key, []).append((r["batch_size"], r["output_tokens_per_s"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
    sizes = sorted({r["batch_size"] for r in results})
    ax.set(xlabel="batch size", ylabel="output tokens/s", title="Throughput vs batch size", xscale="log")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.legend(fontsize=8)
    written.append(_save(fig, out / "tokens_per_s_vs_batch.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        if r["accuracy"] is not None:
            ax.scatter(r["tokens_per_forward"], r["accuracy"], label=_label(r))
    ax.set(xlabel="tokens per forward (every forward counted)", ylabel="accuracy", title="Accuracy vs tokens per forward")
    ax.legend(fontsize=7)
    written.append(_save(fig, out / "accuracy_vs_tpf.png"))

    spec = [r for r in results if r.get("acceptance_histogram")]
    if spec:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in spec:
            hist = {int(k): v for k, v in r["acceptance_histogram"].items()}
            total = sum(hist.values())
            ax.plot(sorted(hist), [hist[k] / total for k in sorted(hist)], marker=".", label=_label(r))
        ax.set(xlabel="tokens per draft+verify cycle", ylabel="fraction of cycles", title="Self-spec acceptance length")
        ax.legend(fontsize=8)
        written.append(_save(fig, out / "acceptance_histogram.png"))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [_label(r) for r in results]
    kinds = sorted({k for r in results for k in r["forward_ms"]})
    width = 0.8 / max(len(kinds), 1)
    for i, kind in enumerate(kinds):
        ax.bar([x + i * width for x in range(len(results))], [r["forward_ms"].get(kind, 0) for r in results],
               width, label=kind)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(results))], labels, rotation=60, ha="right", fontsize=7)
    ax.set(ylabel="mean ms per forward", title="Time per forward kind")
    ax.legend(fontsize=8)
    written.append(_save(fig, out / "forward_time_by_kind.png"))
    return written


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


def write(doc: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    doc["plots"] = plots(doc["results"], out)
    (out / "results.json").write_text(json.dumps(doc, indent=2))
    (out / "report.md").write_text(markdown(doc))
