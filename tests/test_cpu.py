"""dtype="auto" on a CPU: bf16 only where the flags name native bf16 and a timed matmul confirms it."""

from __future__ import annotations

import platform

import pytest
import torch

from trimode import LLM, cpu


@pytest.fixture
def fresh_choice():
    cpu.native_bf16.cache_clear()
    yield
    cpu.native_bf16.cache_clear()


def test_isa_is_the_best_flag():
    assert cpu.cpu_isa({"avx2", "avx512f", "avx512_bf16"}) == "avx512_bf16"
    assert cpu.cpu_isa({"avx2", "avx512_bf16", "amx_bf16"}) == "amx_bf16"
    assert cpu.cpu_isa({"sse4_2"}) == platform.machine()


@pytest.mark.parametrize(
    ("flags", "ratio", "dtype", "why"),
    [
        ({"avx2", "avx512f"}, None, torch.float32, "avx512f: no native bf16"),
        ({"avx2", "avx512_bf16"}, 0.3, torch.bfloat16, "avx512_bf16"),
        ({"amx_bf16", "avx512_bf16"}, 0.2, torch.bfloat16, "amx_bf16"),
        # A VM that lists the flag but traps the instruction: the timing overrules the flag.
        ({"avx512_bf16"}, 8.0, torch.float32, "avx512_bf16 is flagged but a bf16 matmul took 8.0x"),
    ],
)
def test_auto_dtype_follows_flags_and_the_timing(monkeypatch, fresh_choice, flags, ratio, dtype, why):
    timed = []
    monkeypatch.setattr(cpu, "cpu_flags", lambda: flags)
    monkeypatch.setattr(cpu, "bf16_time_ratio", lambda: timed.append(1) or ratio)
    got, reason = cpu.cpu_auto_dtype(3 * 10**9)
    assert got == dtype and reason.startswith(why)
    small, reason = cpu.cpu_auto_dtype(6_800_000)  # the embedded model's size: fp32 whatever the CPU
    assert small == torch.float32 and reason.startswith(why.split(" ")[0].rstrip(":"))
    assert len(timed) == (ratio is not None)  # no timing without the flags, and one timing per process


def test_the_probe_times_both_dtypes():
    assert 0 < cpu.bf16_time_ratio() < 1000


def test_auto_loads_the_cpu_choice_and_says_so(tiny_dir, capfd, monkeypatch):
    monkeypatch.setattr(cpu, "BF16_MIN_PARAMETERS", 0)  # as if the tiny model were a real one
    dtype, why = cpu.cpu_auto_dtype(1)
    llm = LLM(tiny_dir, device="cpu", compile=False)
    assert next(llm.model.parameters()).dtype == dtype
    name = str(dtype).removeprefix("torch.")
    assert f"trimode: cpu: {name} ({why})" in capfd.readouterr().err
    assert next(LLM(tiny_dir, dtype="float32", device="cpu", compile=False).model.parameters()).dtype == torch.float32
