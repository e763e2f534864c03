"""Tensor-parallel workers: the engine (scheduler, decoders, page tables) runs on rank 0 only; every
rank runs each model forward over its own weight slices (`model/tensor_parallel.py`) and its own KV
pool, which holds that rank's KV heads in the same pages as rank 0's.

Before each forward rank 0 broadcasts what the forward reads: per part, the tokens, positions, mask
and slot maps `KVCache.begin` made, and which pool it runs over. The workers build the same parts
over their pools and run the same forward, so every collective inside it (an all-reduce per
o_proj and down_proj, the embedding's, the head's all-gather) pairs up, and all ranks hold the same
logits. Only rank 0 uses them. Messages travel on a gloo group (vLLM's "CPU group") whatever the
device, so a GPU forward's collectives stay on NCCL and the messages never touch the GPU.

Two launches: under torchrun every rank runs the same command and ranks > 0 turn into workers
inside `LLM(...)` (they exit when rank 0 does); otherwise `spawn_workers` starts them, so the server
stays the one process a user starts.

A forward needs every rank: once a worker is gone (or a forward failed on rank 0, leaving the
workers inside its collectives), no forward can run again. The driver then says why (`failure`),
refuses every later forward with `WorkerDead` and stops without messaging the group.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import datetime
import itertools
import os
import signal
import socket
import subprocess
import sys
import weakref
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

import torch
import torch.distributed as dist

from trimode.distributed import backend, join_torchrun
from trimode.kv_cache import KVPool, KVView, Mask
from trimode.model.tensor_parallel import TensorParallel
from trimode.model.transformer import ForwardContext, Part, Transformer

_T = TypeVar("_T")


@dataclass
class _PartMessage:
    """One part of a forward, as host tensors (the pool by its id)."""

    pool: int
    input_ids: torch.Tensor
    positions: torch.Tensor
    mask: Mask
    write_slots: torch.Tensor
    key_slots: torch.Tensor
    run: tuple[int, int] | None
    use_draft_lora: torch.Tensor | bool
    logit_index: torch.Tensor | None


def _host(x: _T) -> _T:
    """A tensor's host copy; anything else as it is."""
    return cast(_T, x.cpu()) if isinstance(x, torch.Tensor) else x


class WorkerDead(RuntimeError):
    """A tensor-parallel worker is gone (or the group is out of step): no forward can run again."""


def _exit_status(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


class TensorParallelDriver:
    """Rank 0's side: names pools to the workers and broadcasts each forward before running it."""

    def __init__(
        self,
        tp: TensorParallel,
        control: dist.ProcessGroup,
        spawned_on_cpu: bool = False,
        workers: list[subprocess.Popen] | None = None,
    ) -> None:
        """`spawned_on_cpu`: this process shares the cores with workers it spawned, until `close`;
        `workers`: the processes of ranks 1.. when this process spawned them (so their death shows
        at once, even with no forward running; torchrun's ranks show it at the next message)."""
        self.tp, self.control = tp, control
        self.workers = workers or []
        self._failure: str | None = None
        self._threads = share_cores(tp.world) if spawned_on_cpu else None
        self._ids = itertools.count()
        self._pool_ids: weakref.WeakKeyDictionary[KVPool, int] = weakref.WeakKeyDictionary()
        # Pools rank 0 let go of, for the workers to free (appended by the garbage collector, from
        # any thread: a deque's append and popleft are atomic).
        self._dropped: deque[int] = deque()
        self.closed = False
        atexit.register(self.close)

    @property
    def failure(self) -> str | None:
        """Why forwards can no longer run (a worker exited, a message or a forward failed), or None."""
        if self._failure is None and not self.closed:
            for rank, proc in enumerate(self.workers, start=1):
                code = proc.poll()
                if code is not None:
                    self._failure = f"tensor-parallel rank {rank} exited ({_exit_status(code)})"
                    break
        return self._failure

    def _broken(self, error: Exception) -> WorkerDead:
        """Record that the group failed with `error`; the error to raise."""
        for proc in self.workers:  # a killed worker's sockets close just before it can be reaped
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
        if self.failure is None:
            self._failure = f"a tensor-parallel forward failed ({type(error).__name__}: {error})"
        return WorkerDead(self._failure)

    def _send(self, message: tuple) -> None:
        if self.failure is not None:
            raise WorkerDead(self.failure)
        try:
            dist.broadcast_object_list([message], src=0, group=self.control)
        except RuntimeError as e:  # gloo: a rank closed its connection
            raise self._broken(e) from e

    def add_pool(self, pool: KVPool) -> None:
        """Every worker allocates the same pages, for its own KV heads."""
        pool_id = next(self._ids)
        self._pool_ids[pool] = pool_id
        weakref.finalize(pool, self._dropped.append, pool_id)
        self._send(("pool", pool_id, pool.num_pages, pool.page_size))

    def announce(self, parts: list[Part], pools: list[KVPool]) -> None:
        """Send a forward over `parts` (each begun on its pool) to the workers, which run it at once."""
        messages = []
        for part, pool in zip(parts, pools):
            ctx, view = part.ctx, part.ctx.kv
            assert view is not None, "a tensor-parallel forward runs over the KV cache"
            messages.append(
                _PartMessage(
                    self._pool_ids[pool],
                    part.input_ids.cpu(),
                    ctx.positions.cpu(),
                    _host(ctx.mask),
                    view.write_slots.cpu(),
                    view.key_slots.cpu(),
                    view.run,
                    _host(ctx.use_draft_lora),
                    _host(part.logit_index),
                )
            )
        dropped = [self._dropped.popleft() for _ in range(len(self._dropped))]
        self._send(("forward", dropped, messages))

    def run(self, model: Transformer, parts: list[Part], pools: list[KVPool]) -> list[torch.Tensor]:
        """Announce a forward over `parts`, then run rank 0's share of it. One that fails here
        leaves the workers inside its collectives, out of step with every later message."""
        self.announce(parts, pools)
        try:
            return model.forward_parts(parts)
        except Exception as e:
            raise self._broken(e) from e

    def close(self) -> None:
        """Stop the workers (they leave their loop and exit); safe to call twice. After a failure
        there is no group to message: the living workers end with this process."""
        if self.closed:
            return
        failed = self.failure is not None
        self.closed = True
        atexit.unregister(self.close)
        if not failed:
            self._send(("stop",))
        dist.destroy_process_group()
        if self._threads is not None:
            torch.set_num_threads(self._threads)


def serve_forwards(model: Transformer, control: dist.ProcessGroup) -> None:
    """A worker's loop: run every forward rank 0 announces, until it says stop."""
    device = model.diffusion_head.weight.device
    pools: dict[int, KVPool] = {}
    while True:
        box: list = [None]
        try:
            dist.broadcast_object_list(box, src=0, group=control)
        except RuntimeError as e:
            # Rank 0 ended without a stop: killed, or by a signal that skips exit handlers (uvicorn
            # re-raises SIGTERM after its graceful shutdown). A worker never outlives it.
            print(f"trimode: tensor-parallel rank {dist.get_rank()}: rank 0 is gone ({e}); exiting", file=sys.stderr)
            return
        message = box[0]
        if message[0] == "stop":
            return
        if message[0] == "pool":
            _, pool_id, pages, page_size = message
            pools[pool_id] = model.new_kv_pool(pages, page_size)
            continue
        _, dropped, messages = message
        for pool_id in dropped:
            pools.pop(pool_id, None)
        parts = []
        for m in messages:
            pool = pools[m.pool]
            mask = m.mask.to(device) if isinstance(m.mask, torch.Tensor) else m.mask
            view = KVView(pool.k, pool.v, m.write_slots.to(device), m.key_slots.to(device), m.run)
            lora = m.use_draft_lora.to(device) if isinstance(m.use_draft_lora, torch.Tensor) else m.use_draft_lora
            index = m.logit_index.to(device) if m.logit_index is not None else None
            parts.append(Part(m.input_ids.to(device), ForwardContext(m.positions.to(device), mask, view, lora), index))
        with torch.inference_mode():
            model.forward_parts(parts)


def join_torchrun_ranks(world: int, device: torch.device) -> tuple[TensorParallel, torch.device]:
    """Under torchrun: this process's rank in a tensor-parallel group of every launched rank (the
    launch must start exactly `world` of them), and the device it runs on."""
    launched = int(os.environ["WORLD_SIZE"])
    if launched != world:
        raise ValueError(
            f"tensor_parallel_size is {world} but torchrun started {launched} processes; launch with "
            f"--nproc-per-node {world} (one process per tensor-parallel rank)"
        )
    device = join_torchrun(device)
    return TensorParallel(dist.get_rank(), world), device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_workers(
    world: int, device: torch.device, path: Path, dtype: torch.dtype, load_draft_lora: bool
) -> tuple[TensorParallel, list[subprocess.Popen]]:
    """Start ranks 1..world-1 as processes of their own (a fresh interpreter running `worker_main`, so
    the caller's script is never re-imported), each loading its slices of `path`; this process
    becomes rank 0 of their group, on 127.0.0.1. A worker exits when rank 0 stops or dies.
    Returns rank 0's place in the group and the workers' processes."""
    if dist.is_initialized():
        raise RuntimeError(
            "this process already belongs to a torch.distributed group: one tensor-parallel LLM per "
            "process (close() the other first, or launch with torchrun)"
        )
    if device.type == "cuda" and world > torch.cuda.device_count():
        raise ValueError(
            f"tensor_parallel_size {world} needs {world} GPUs (one per rank); this machine has "
            f"{torch.cuda.device_count()}"
        )
    address = f"tcp://127.0.0.1:{_free_port()}"
    dtype_name = str(dtype).removeprefix("torch.")
    workers = []
    for rank in range(1, world):
        args = [str(rank), str(world), address, device.type, str(path), dtype_name, str(int(load_draft_lora))]
        args.append(str(os.getpid()))
        code = f"from trimode.engine.tp_workers import worker_main; worker_main({args!r})"
        workers.append(subprocess.Popen([sys.executable, "-c", code]))
    dist.init_process_group(backend(device), init_method=address, rank=0, world_size=world)
    return TensorParallel(0, world), workers


def share_cores(world: int) -> int:
    """On a CPU, the ranks split the cores (as torchrun's OMP_NUM_THREADS=1 does): more threads than
    cores, each rank's spinning on the others', slow every product several times over. Returns the
    thread count before."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return before


# Workers wait on the control group for rank 0's next forward for as long as it is idle (a server
# with no requests for hours): gloo's default 30-minute timeout would end them.
CONTROL_TIMEOUT = datetime.timedelta(days=365)


def control_group() -> dist.ProcessGroup:
    """The gloo group rank 0's messages travel on (every rank must call this, in the same order)."""
    return dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


def worker_main(argv: list[str]) -> None:
    """A spawned rank: join rank 0's group, load this rank's slices, serve forwards."""
    from trimode.model.loader import load_model

    rank_, world_, address, device_type, path, dtype, lora, parent = argv
    rank, world = int(rank_), int(world_)
    _die_with(int(parent))
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend(device), init_method=address, rank=rank, world_size=world)
    if device.type == "cpu":
        share_cores(world)
    control = control_group()
    model = load_model(path, getattr(torch, dtype), device, bool(int(lora)), tp=TensorParallel(rank, world))
    run_worker(model, control)


def _die_with(parent: int) -> None:
    """End this worker when the process that spawned it ends, however it ends: a rank 0 killed
    before the group formed would otherwise leave it waiting for a rendezvous that never comes.
    (Linux's parent-death signal, which follows the thread that spawned the worker: build a
    tensor-parallel LLM on a thread that outlives it. Elsewhere a dead rank 0 is noticed at the
    next message.)"""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it ended before the signal was armed
        raise SystemExit(f"trimode: tensor-parallel rank: the process that started it ({parent}) is gone")


def run_worker(model: Transformer, control: dist.ProcessGroup) -> None:
    """Serve forwards until rank 0 stops, then leave the group."""
    serve_forwards(model, control)
    dist.destroy_process_group()
