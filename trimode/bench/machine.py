"""The machine card: what the figures were measured on, and its speed of light.

A batch-1 AR step reads every weight once (of the input embedding, one row), so those bytes over the
memory's read bandwidth are the fastest it can run (`ar_step_speed_of_light_ms`). GPUs have
data-sheet bandwidths. A CPU's depends on its memory channels and on what a VM grants, so it is
measured once per machine and cached: a sum over a tensor far larger than any cache, best of
several runs, on the threads torch uses.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from trimode.cpu import cpu_auto_dtype, cpu_flags, cpu_isa, cpu_name
from trimode.engine.compiled import default_cache_dir
from trimode.llm import LLM

# Peak HBM bandwidth (bytes/s) by GPU name, from the vendors' data sheets.
PEAK_BANDWIDTH = {
    "H200": 4.8e12,
    "H100 NVL": 3.9e12,
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,
    "A100": 2.0e12,
    "L40S": 0.864e12,
}


PROBE_BYTES = 512 * 2**20  # the bandwidth probe: far past any L3 cache (tens of MiB), small beside RAM
PROBE_RUNS = 5


def measure_read_bandwidth(num_bytes: int = PROBE_BYTES, runs: int = PROBE_RUNS) -> float:
    """Bytes per second a sum over `num_bytes` of float32 reads, the best of `runs` after a warm-up
    (which also faults the pages in)."""
    x = torch.ones(num_bytes // 4, dtype=torch.float32)
    x.sum()
    best = math.inf
    for _ in range(runs):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * x.element_size() / best


def default_bandwidth_cache() -> Path:
    """Beside the compiled programs' cache: ~/.cache/trimode/bandwidth.json by default."""
    return default_cache_dir().parent / "bandwidth.json"


def cpu_read_bandwidth(cache: Path | None = None) -> float:
    """This machine's measured read bandwidth (bytes/s), from `cache` when this CPU, core count,
    thread count and torch were measured before; measured and saved there otherwise."""
    path = cache or default_bandwidth_cache()
    key = f"{cpu_name()} | {os.cpu_count()} cores | {torch.get_num_threads()} threads | torch {torch.__version__}"
    known = json.loads(path.read_text()) if path.is_file() else {}
    if key not in known:
        known[key] = measure_read_bandwidth()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(known, indent=1) + "\n")
    return float(known[key])


def ar_step_bytes(llm: LLM) -> int:
    """Bytes a batch-1 AR step reads: every weight, but of the input embedding only its token's row."""
    embed = llm.model.encoder.embed_tokens.weight
    return llm.model.weight_bytes - (embed.shape[0] - 1) * embed.shape[1] * embed.element_size()


def dtype_card(llm: LLM, bandwidth_cache: Path | None = None) -> dict[str, Any]:
    """What depends on the model's dtype: its bytes and its AR step's speed of light (the step's
    bytes at the peak read bandwidth: GPUs' from the data sheet, a CPU's measured)."""
    card: dict[str, Any] = {
        "dtype": str(llm.model.diffusion_head.weight.dtype).removeprefix("torch."),
        # With tensor parallelism, one rank's share: what each device reads per step.
        "weight_bytes": llm.model.weight_bytes,
        "ar_step_bytes": ar_step_bytes(llm),
    }
    if llm.device.type == "cuda":
        name = torch.cuda.get_device_name(llm.device)
        peak = next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)
        source = "data sheet"
    else:
        peak = cpu_read_bandwidth(bandwidth_cache)
        source = f"measured: a float32 sum over {PROBE_BYTES // 2**20} MiB, best of {PROBE_RUNS}, cached per machine"
    if peak:
        card["peak_bandwidth_bytes_per_s"] = round(peak)
        card["peak_bandwidth_source"] = source
        card["ar_step_speed_of_light_ms"] = round(1000 * card["ar_step_bytes"] / peak, 4)
    return card


def machine_card(llm: LLM, bandwidth_cache: Path | None = None) -> dict[str, Any]:
    card: dict[str, Any] = {
        "device": torch.cuda.get_device_name(llm.device) if llm.device.type == "cuda" else cpu_name(),
        "device_type": llm.device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        # Per program the run used: seconds to compile it, or to load it from the cache.
        "compiled": {k: round(t, 2) for k, t in sorted(llm.runner.compiled.seconds.items())}
        if llm.runner.compiled is not None
        else {},
        "tensor_parallel_size": llm.runner.tp_driver.tp.world if llm.runner.tp_driver is not None else 1,
        "parameters": sum(p.numel() for p in llm.model.parameters()),
    }
    graphs = llm.runner.graphs
    if graphs is not None:
        # What the run's CUDA graphs cost: capture time and the GPU memory they reserved.
        card["cuda_graphs"] = {"count": len(graphs.buckets), "seconds": round(graphs.seconds, 2), "bytes": graphs.bytes}
    if llm.device.type == "cpu":
        card["cpu_isa"] = cpu_isa(cpu_flags())
        auto, why = cpu_auto_dtype(llm.config.num_parameters)
        card["cpu_auto_dtype"] = f"{str(auto).removeprefix('torch.')} ({why})"  # what dtype="auto" picks here
    return card | dtype_card(llm, bandwidth_cache)


def client_card() -> dict[str, Any]:
    """Where an HTTP bench ran from (the server's machine is the server's to describe)."""
    return {"client_cpu": cpu_name(), "client_cores": os.cpu_count(), "python": platform.python_version()}
