"""Joining a torch.distributed group: whether torchrun launched this process, the backend a device
wants, and the default group of a torchrun launch. Training (`train/parallel.py`) and
tensor-parallel inference (`engine/tp_workers.py`) both start here."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def backend(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def launched_by_torchrun() -> bool:
    """Whether torchrun (or anything setting its environment) started this process as one rank."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("WORLD_SIZE" in os.environ and "RANK" in os.environ)


def join_torchrun(device: torch.device) -> torch.device:
    """Join (once) the default group of the torchrun launch this process is a rank of; returns the
    device it runs on: on GPUs, cuda:LOCAL_RANK, made current."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend(device))
    return device
