"""What this CPU is and which dtype it multiplies fastest: `dtype="auto"` on a CPU asks here.

A CPU with native bf16 matrix instructions (AMX tiles, AVX-512 BF16 dot products) runs a bf16
matmul faster than an fp32 one and reads half the bytes, so a 32-token block pass costs about what
a 1-token AR step does, as on a GPU. Without them torch emulates bf16 (~30x slower than fp32 on an
AVX2 CPU). Flags can lie in VMs (a hypervisor may list an instruction it traps), so a flagged CPU
is confirmed by timing one small matmul in each dtype.

Models under a billion parameters stay fp32 even there. Their steps are bound by dispatch, not by
streaming weights (the embedded model's AR step takes as long in bf16 as in fp32), and fp32 keeps
the engine's batch invariance exact: bf16 rounds each activation to 8 bits, so the last-bit
differences a padded key span makes in attention's reductions change sampled tokens of a row
batched with longer ones (in fp32 they stay far below any token's margin).
"""

from __future__ import annotations

import functools
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# cpuinfo flags, best first: native bf16 matrix math (AMX tiles, AVX-512 dot products), then the
# widest vectors without it.
CPU_ISAS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")
NATIVE_BF16 = ("amx_bf16", "avx512_bf16")

# The confirming micro-timing: a 32-row block pass through a 1024x1024 projection (4 MiB of fp32
# weights, cache-resident, so it times the arithmetic). Native bf16 measured 0.3x fp32's time on
# an AVX512-BF16 Zen 4; emulated bf16 is many times slower than fp32, so 1.0 splits them widely.
PROBE_ROWS, PROBE_DIM, PROBE_RUNS = 32, 1024, 10
BF16_MIN_PARAMETERS = 10**9  # the smallest NLD release has 3B


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    return set(_cpuinfo_field("flags").split())


def cpu_name() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_isa(flags: set[str]) -> str:
    """The best of CPU_ISAS the flags name, else the machine's architecture."""
    return next((isa for isa in CPU_ISAS if isa in flags), platform.machine())


def _cpuinfo_field(name: str) -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.split(":", 1)[0].strip() == name:
                return line.split(":", 1)[1].strip()
    return ""


def bf16_time_ratio() -> float:
    """A bf16 matmul's time over the same fp32 one's (best of PROBE_RUNS each, after a warm-up)."""
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.randn(PROBE_DIM, PROBE_DIM).to(dtype)
        x = torch.randn(PROBE_ROWS, PROBE_DIM).to(dtype)
        F.linear(x, weight)
        times = []
        for _ in range(PROBE_RUNS):
            start = time.perf_counter()
            F.linear(x, weight)
            times.append(time.perf_counter() - start)
        best[dtype] = min(times)
    return best[torch.bfloat16] / best[torch.float32]


@functools.cache
def native_bf16() -> tuple[bool, str]:
    """Whether this CPU multiplies bf16 natively (its flags, confirmed by a timing), and why."""
    isa = cpu_isa(cpu_flags())
    if isa not in NATIVE_BF16:
        return False, f"{isa}: no native bf16"
    ratio = bf16_time_ratio()
    if ratio >= 1.0:
        return False, f"{isa} is flagged but a bf16 matmul took {ratio:.1f}x the fp32 time"
    return True, isa


def cpu_auto_dtype(num_parameters: int) -> tuple[torch.dtype, str]:
    """What `dtype="auto"` loads on this CPU for a model of `num_parameters`, and why."""
    native, why = native_bf16()
    if not native:
        return torch.float32, why
    if num_parameters < BF16_MIN_PARAMETERS:
        return torch.float32, f"{why}, but {num_parameters / 1e6:.1f}M parameters: float32 below 1B"
    return torch.bfloat16, why
