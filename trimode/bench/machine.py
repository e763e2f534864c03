"""The machine card: what the figures were measured on."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

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


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_card(llm: LLM) -> dict[str, Any]:
    params = sum(p.numel() for p in llm.model.parameters())
    weight_bytes = llm.model.weight_bytes
    card: dict[str, Any] = {
        "device": torch.cuda.get_device_name(llm.device) if llm.device.type == "cuda" else cpu_name(),
        "device_type": llm.device.type,
        "dtype": str(llm.model.diffusion_head.weight.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        # Per program the run used: seconds to compile it, or to load it from the cache.
        "compiled": {k: round(t, 2) for k, t in sorted(llm.runner.compiled.seconds.items())}
        if llm.runner.compiled is not None
        else {},
        # With tensor parallelism, `parameters` and `weight_bytes` are one rank's share: what each
        # device reads per step, so the speed of light below stays per device.
        "tensor_parallel_size": llm.runner.tp_driver.tp.world if llm.runner.tp_driver is not None else 1,
        "parameters": params,
        "weight_bytes": weight_bytes,
    }
    graphs = llm.runner.graphs
    if graphs is not None:
        # What the run's CUDA graphs cost: capture time and the GPU memory they reserved.
        card["cuda_graphs"] = {"count": len(graphs.buckets), "seconds": round(graphs.seconds, 2), "bytes": graphs.bytes}
    if llm.device.type == "cuda":
        name = card["device"]
        peak = next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)
        if peak:
            # Batch-1 AR speed of light: every weight is read once per token.
            card["peak_bandwidth_bytes_per_s"] = peak
            card["ar_step_speed_of_light_ms"] = round(1000 * weight_bytes / peak, 4)
    return card


def client_card() -> dict[str, Any]:
    """Where an HTTP bench ran from (the server's machine is the server's to describe)."""
    return {"client_cpu": cpu_name(), "client_cores": os.cpu_count(), "python": platform.python_version()}
