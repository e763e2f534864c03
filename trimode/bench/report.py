"""The report: a table on stdout, results.json, report.md and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trimode.bench.suites import short_length

COLUMNS = (
    ("config", 26),
    ("tok/s [95% CI]", 20),
    ("req/s", 7),
    ("TPF", 6),
    ("tok/cycle", 9),
    ("passes/blk", 10),
    ("TTFT p50", 9),
    ("ITL p50", 8),
    ("acc", 6),
    ("vs AR [95% CI]", 18),
)
HTTP_COLUMNS = (
    ("config", 26),
    ("tok/s [95% CI]", 20),
    ("req/s", 7),
    ("TPF", 6),
    ("failed", 6),
    ("TTFT p50", 9),
    ("TTFT p99", 9),
    ("ITL p50", 8),
    ("ITL p99", 8),
    ("acc", 6),
    ("vs AR [95% CI]", 18),
)


def _load(r: dict[str, Any]) -> int:
    """The x of a result: batch size offline, client concurrency over HTTP."""
    return r["batch_size"] if "batch_size" in r else r["concurrency"]


def _label(r: dict[str, Any]) -> str:
    if "label" in r:  # offline: the configuration's own
        return r["label"]
    parts = [r["mode"], f"bs{r['batch_size']}" if "batch_size" in r else f"c{r['concurrency']}"]
    if r.get("block_length") is not None:
        parts.append(f"B{r['block_length']}")
    if r.get("threshold") is not None:
        parts.append(f"t{r['threshold']:g}")
    return " ".join(parts)


def _fmt(x: Any, spec: str) -> str:
    """ "-" for a figure a configuration does not have (None; NaN: e.g. a baseline's token times)."""
    return "-" if x is None or x != x else format(x, spec)


def _with_ci(r: dict[str, Any], key: str, spec: str) -> str:
    """A figure and, when the run has one, its bootstrap 95% interval."""
    ci = r.get(f"{key}_ci")
    text = _fmt(r.get(key), spec)
    return text if ci is None else f"{text} [{ci['lo']:{spec}}, {ci['hi']:{spec}}]"


def _long(doc: dict[str, Any]) -> str:
    if "context_lengths" not in doc:
        return ""
    lengths = ", ".join(short_length(n) for n in doc["context_lengths"])
    return f" at context lengths {lengths} (key-value recall at depth {doc['depth']:g}, and continuation)"


def measured(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """trimode's plain results, without the A/A control, a baseline or the runs asking for
    logprobs or a grammar (which plots and the crossover leave out)."""
    return [
        r
        for r in results
        if not r.get("control")
        and r.get("logprobs") is None
        and r.get("structured") is None
        and r.get("engine", "trimode") == "trimode"
    ]


def table(results: list[dict[str, Any]]) -> str:
    http = bool(results) and "concurrency" in results[0]
    columns = HTTP_COLUMNS if http else COLUMNS
    lines = ["  ".join(name.rjust(w) for name, w in columns)]
    for r in results:
        ttft, itl = r["ttft_ms"], r["itl_ms"]
        middle = (
            (
                str(r["num_failed"]),
                _fmt(ttft["p50"], ".1f"),
                _fmt(ttft["p99"], ".1f"),
                _fmt(itl["p50"], ".2f"),
                _fmt(itl["p99"], ".2f"),
            )
            if http
            else (
                _fmt(r.get("tokens_per_cycle"), ".2f"),
                _fmt(r.get("denoise_passes_per_block"), ".2f"),
                _fmt(ttft["p50"], ".1f"),
                _fmt(itl["p50"], ".2f"),
            )
        )
        cells = (
            _label(r),
            _with_ci(r, "output_tokens_per_s", ".1f"),
            _fmt(r["requests_per_s"], ".2f"),
            _fmt(r["tokens_per_forward"], ".2f"),
            *middle,
            _fmt(r["accuracy"], ".3f"),
            _with_ci(r, "speedup_vs_ar", ".2f"),
        )
        lines.append("  ".join(c.rjust(w) for c, (_, w) in zip(cells, columns)))
    return "\n".join(lines)


def markdown(doc: dict[str, Any]) -> str:
    http = "endpoint" in doc
    head = [
        "config",
        "tokens/s",
        "requests/s",
        "tokens/forward",
        "TTFT p50/p99 ms",
        "ITL p50/p99 ms",
        "accuracy",
        "speed-up vs AR",
    ]
    head += (
        ["failed", "chunk gap p50/p99 ms", "latency p50/p99 ms"]
        if http
        else ["tokens/cycle", "denoise passes/block", "forward ms"]
    )
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def pair(d: dict[str, float], spec: str) -> str:
        return f"{_fmt(d['p50'], spec)} / {_fmt(d['p99'], spec)}"

    for r in doc["results"]:
        cells = [
            _label(r),
            _with_ci(r, "output_tokens_per_s", ".1f"),
            _fmt(r["requests_per_s"], ".2f"),
            _fmt(r["tokens_per_forward"], ".2f"),
            pair(r["ttft_ms"], ".1f"),
            pair(r["itl_ms"], ".2f"),
            _fmt(r["accuracy"], ".3f"),
            _with_ci(r, "speedup_vs_ar", ".2f"),
        ]
        if http:
            cells += [str(r["num_failed"]), pair(r["chunk_gap_ms"], ".1f"), pair(r["e2e_ms"], ".0f")]
        else:
            cells += [
                _fmt(r.get("tokens_per_cycle"), ".2f"),
                _fmt(r.get("denoise_passes_per_block"), ".2f"),
                ", ".join(f"{k} {v:.2f}" for k, v in r["forward_ms"].items()),
            ]
        rows.append("| " + " | ".join(cells) + " |")
    card = "\n".join(f"- {k}: {v}" for k, v in doc["machine"].items())
    if http:
        how = (
            f"{doc['endpoint']} (model `{doc['model']}`), closed loop, "
            + (f"{doc['duration']} s per configuration" if doc.get("duration") else "every prompt once per round")
            + f", warm-up {doc['warmup']} request(s) per client excluded; {doc['repeats']} rounds, one slice of "
            "every configuration per round in a shuffled order; [95% bootstrap intervals over slices, speed-ups "
            "paired by round]"
        )
    else:
        how = (
            f"warm-up {doc['warmup']} batches excluded; {doc['repeats']} repeat(s), configurations interleaved "
            "batch by batch in a shuffled order per repeat; [95% bootstrap intervals over (batch, repeat) units, "
            "speed-ups paired]"
        )
    parts = [
        f"# trimode bench\n\nCommand: `{doc['command']}`\n",
        f"## Machine\n\n{card}\n",
        f"## Results ({doc['num_prompts']} prompts, suite `{doc['suite']}`{_long(doc)}, max_tokens "
        f"{doc['max_tokens']}, {how})\n",
        "\n".join(rows) + "\n",
    ]
    mixed = [r for r in doc["results"] if r.get("by_mode")]
    for r in mixed:
        parts.append(
            f"### {_label(r)}: per mode\n\n| mode | requests | tokens/s | tokens/forward | TTFT p50/p99 ms | "
            "ITL p50/p99 ms |\n|---|---|---|---|---|---|"
        )
        parts += [
            f"| {m} | {b['num_requests']} | {b['output_tokens_per_s']:.1f} | {_fmt(b['tokens_per_forward'], '.2f')}"
            f" | {pair(b['ttft_ms'], '.1f')} | {pair(b['itl_ms'], '.2f')} |"
            for m, b in r["by_mode"].items()
        ]
        parts.append("")
    parts += _speed_of_light(doc)
    if "warnings" in doc:
        checks = "\n".join(f"- warning: {w}" for w in doc["warnings"]) or (
            "- the A/A control's ratio interval contains 1.0, and no speed-up exceeds its tokens-per-forward prediction"
        )
        parts.append(f"## Checks\n\n{checks}\n")
    for b in doc.get("baselines", []):
        title = f"## Hugging Face baseline{', ' + b['dtype'] if 'dtype' in b else ''}"
        parts.append(f"{title}\n\n" + "\n".join(f"- {k}: {v}" for k, v in b.items()) + "\n")
    if doc.get("crossover"):
        parts.append(f"\n## Crossover\n\n{doc['crossover']}\n")
    return "\n".join(parts) + "\n"


def _speed_of_light(doc: dict[str, Any]) -> list[str]:
    """Each measured AR step against its speed of light (the step's bytes read once at the peak read
    bandwidth; per dtype where dtypes were swept), where the card has one."""
    cards = doc.get("dtypes") or {None: doc["machine"]}
    ar = [r for r in measured(doc["results"]) if "ar" in r.get("forward_ms", {})]
    if not ar or not all(c.get("ar_step_speed_of_light_ms") for c in cards.values()):
        return []
    lines = [
        f"- {name or c['dtype']}: {c['ar_step_bytes']} bytes per step at {c['peak_bandwidth_bytes_per_s'] / 1e9:.1f} "
        f"GB/s ({c['peak_bandwidth_source']}): {c['ar_step_speed_of_light_ms']:.3f} ms at best"
        for name, c in cards.items()
    ]
    rows = []
    for r in ar:
        light = cards[r.get("dtype")]["ar_step_speed_of_light_ms"]
        rows.append(f"| {_label(r)} | {r['forward_ms']['ar']:.2f} | {100 * light / r['forward_ms']['ar']:.0f}% |")
    head = "| config | AR step ms | of the speed of light |\n|---|---|---|"
    return ["## AR steps against the speed of light\n", *lines, "", head, *rows, "", *_pass_costs(doc)]


def _pass_costs(doc: dict[str, Any]) -> list[str]:
    """Every block pass's forward time in AR steps of the same batch size, context and dtype: what
    the block modes' tokens per forward must buy back (a GPU's block pass costs about one step)."""
    results = measured(doc["results"])
    step = {
        (r["batch_size"], r.get("context_length"), r.get("dtype")): r["forward_ms"]["ar"]
        for r in results
        if "ar" in r["forward_ms"]
    }
    rows = []
    for r in results:
        ar = step.get((r["batch_size"], r.get("context_length"), r.get("dtype")))
        costs = {k: ms / ar for k, ms in r["forward_ms"].items() if k not in ("ar", "prefill")} if ar else {}
        if costs:
            rows.append(f"| {_label(r)} | " + ", ".join(f"{k} {c:.2f}" for k, c in costs.items()) + " |")
    if not rows:
        return []
    return ["## Block passes in AR steps\n\n| config | forward ms / AR step ms |\n|---|---|", *rows, ""]


def crossover(results: list[dict[str, Any]]) -> str | None:
    """The smallest batch size at which AR's tokens/s beats every selfspec configuration (at each
    context length, where the long suite swept several)."""
    results = measured(results)
    lengths = sorted({r.get("context_length") or 0 for r in results})
    found = []
    for length in lengths:
        at = _crossover([r for r in results if (r.get("context_length") or 0) == length])
        if at is not None:
            found.append(f"context {length}: {at}" if length else at)
    return "; ".join(found) or None


def _crossover(results: list[dict[str, Any]]) -> str | None:
    sizes = sorted({r["batch_size"] for r in results})
    best = {
        bs: max(
            (r["output_tokens_per_s"] for r in results if r["mode"] == "selfspec" and r["batch_size"] == bs),
            default=None,
        )
        for bs in sizes
    }
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

    results = measured(results)
    written = []
    series: dict[str, list[tuple[int, float]]] = {}
    for r in results:
        key = " ".join(p for i, p in enumerate(_label(r).split()) if i != 1)
        series.setdefault(key, []).append((_load(r), r["output_tokens_per_s"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
    sizes = sorted({_load(r) for r in results})
    ax.set(
        xlabel="batch size" if "batch_size" in results[0] else "concurrent clients",
        ylabel="output tokens/s",
        title="Throughput vs load",
        xscale="log",
    )
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.legend(fontsize=8)
    written.append(_save(fig, out / "tokens_per_s_vs_batch.png"))

    scored = [r for r in results if r["accuracy"] is not None and r["tokens_per_forward"] is not None]
    if scored:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in scored:
            ax.scatter(r["tokens_per_forward"], r["accuracy"], label=_label(r))
        ax.set(
            xlabel="tokens per forward (every forward counted)",
            ylabel="accuracy",
            title="Accuracy vs tokens per forward",
        )
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

    lengths = sorted({r["context_length"] for r in results if r.get("context_length")})
    if len(lengths) > 1:
        written.append(_save(_by_context(results, lengths), out / "long_context.png"))

    labels = [_label(r) for r in results]
    kinds = sorted({k for r in results for k in r.get("forward_ms", {})})
    if kinds:
        written.append(
            _save(
                _bars(
                    labels,
                    {k: [r["forward_ms"].get(k, 0) for r in results] for k in kinds},
                    "mean ms per forward",
                    "Time per forward kind",
                ),
                out / "forward_time_by_kind.png",
            )
        )
    timed = [r for r in results if "chunk_gap_ms" in r and r["num_requests"]]
    if timed:
        latency = {
            f"{name} {q}": [r[key][q] for r in timed]
            for name, key in (("TTFT", "ttft_ms"), ("ITL", "itl_ms"))
            for q in ("p50", "p99")
        }
        written.append(
            _save(
                _bars([_label(r) for r in timed], latency, "ms (log scale)", "Latency under load", log=True),
                out / "latency.png",
            )
        )
    return written


def _by_context(results: list[dict[str, Any]], lengths: list[int]) -> Any:
    """Tokens/s and TTFT p50 against context length, a line per configuration."""
    import matplotlib.pyplot as plt

    fig, (rate, ttft) = plt.subplots(1, 2, figsize=(11, 4.5))
    series: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        series.setdefault(" ".join(p for p in _label(r).split() if not p.startswith("ctx")), []).append(r)
    for key, rs in series.items():
        rs.sort(key=lambda r: r["context_length"])
        xs = [r["context_length"] for r in rs]
        rate.plot(xs, [r["output_tokens_per_s"] for r in rs], marker="o", label=key)
        ttft.plot(xs, [r["ttft_ms"]["p50"] for r in rs], marker="o", label=key)
    for ax, ylabel, title in ((rate, "output tokens/s", "Throughput"), (ttft, "TTFT p50 ms", "Time to first token")):
        ax.set(xlabel="context length (tokens)", ylabel=ylabel, title=f"{title} vs context length", xscale="log")
        ax.set_xticks(lengths, [short_length(n) for n in lengths])
        ax.legend(fontsize=8)
    ttft.set_yscale("log")
    return fig


def _bars(labels: list[str], series: dict[str, list[float]], ylabel: str, title: str, log: bool = False) -> Any:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(labels))], values, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels, rotation=60, ha="right", fontsize=7)
    ax.set(ylabel=ylabel, title=title, yscale="log" if log else "linear")
    ax.legend(fontsize=8)
    return fig


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
