"""The engine on its own thread, fed by the server's event loop.

The event loop validates a request, tokenizes it on a worker thread (never on the loop), then hands
it over through a command queue; the engine thread drains commands between steps, runs `step()`,
and pushes each request's outputs into that request's asyncio queue. Aborts (client gone) take
effect before the next step. A request the engine fails gets an `EngineError` alone. The thread
beats a heartbeat every loop iteration, so /health can tell a frozen engine from a busy one. Once a
tensor-parallel worker is dead nothing can run: every request ends with `WorkerDead` (HTTP 503),
new ones are refused with it, and /health says so. Queue places are counted per client request
(its n samples and prompts take one). Shutdown drains: new requests are refused at once, running
ones get until a deadline, then end with `ShuttingDown`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from trimode.engine.llm_engine import LLMEngine
from trimode.engine.scheduler import QueueFull
from trimode.engine.tp_workers import WorkerDead
from trimode.outputs import RequestOutput
from trimode.sampling_params import Mode, SamplingParams
from trimode.server.metrics import Metrics

logger = logging.getLogger("trimode.server")
T = TypeVar("T")
TOKENIZER_THREADS = 2  # tokenizers releases the GIL while encoding, so these run beside the loop


class EngineError(Exception):
    """Serving this request failed inside the engine (a bug, not the request's input): HTTP 500."""


class ShuttingDown(Exception):
    """The server is shutting down: HTTP 503, or an error event ending a stream."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


@dataclass
class EngineStatus:
    """A snapshot the engine thread writes each iteration; the event loop only reads it."""

    running: int = 0
    waiting: int = 0
    heartbeat: float = 0.0  # time.monotonic() at the end of the last loop iteration


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.max_queue = engine.config.max_queue
        self.metrics = Metrics()
        self.metrics.kv_budget.set(engine.pool.num_tokens)
        self.metrics.kv_bytes.set(engine.pool.num_bytes)
        self.status = EngineStatus(heartbeat=time.monotonic())
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._modes: dict[str, str] = {}  # request id -> mode, for the abort counter
        self._pending: Counter[str] = Counter()  # parent request id -> its requests handed over, not yet queued
        self._failure_logged = False
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._drain_deadline: float | None = None
        self._counter = 0
        self._tokenizer_pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="trimode-tokenize")
        self._thread = threading.Thread(target=self._run, name="trimode-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def heartbeat_age(self) -> float:
        return time.monotonic() - self.status.heartbeat

    @property
    def worker_failure(self) -> str | None:
        """Why a tensor-parallel worker can no longer run forwards (None: all can, or there are none)."""
        driver = self.engine.runner.tp_driver
        return None if driver is None else driver.failure

    def _worker_dead(self, failure: str) -> WorkerDead:
        return WorkerDead(f"a tensor-parallel worker is dead ({failure}): this server cannot generate until restarted")

    @property
    def is_draining(self) -> bool:
        return self._drain_deadline is not None

    def drain(self, timeout: float) -> None:
        """Refuse new requests from now on; end whatever still runs `timeout` seconds from now."""
        if self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + timeout
            self._wake.set()

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU-heavy request work (tokenizing, chat templates, grammars, building a large
        answer) off the event loop, on the server's few worker threads."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_pool, fn, *args)

    def new_request_id(self, prefix: str) -> str:
        with self._lock:
            self._counter += 1
            return f"{prefix}-{self._counter}"

    def submit(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        grammar: Any = None,
        parent_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Validate (ValueError), check the queue (QueueFull, ShuttingDown, WorkerDead), then stream
        the outputs. `grammar`: the request's structured-output matcher, compiled off the engine
        thread; `parent_id`: the client request it is one sample or prompt of (one queue place)."""
        if self.is_draining:
            raise ShuttingDown("the server is shutting down and takes no new requests")
        failure = self.worker_failure
        if failure is not None:
            raise self._worker_dead(failure)
        self.engine.check_fits(prompt_ids, params)
        parent = parent_id if parent_id is not None else request_id
        scheduler = self.engine.scheduler
        with self._lock:
            # Reads of the scheduler's places (a dict's len and membership) are safe from this thread.
            if parent not in self._pending and not scheduler.has_place(parent):
                handed = sum(1 for p in self._pending if not scheduler.has_place(p))
                if scheduler.num_places + handed >= self.max_queue:
                    raise QueueFull(f"the queue is full ({self.max_queue} waiting); retry later")
            self._pending[parent] += 1
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        self._modes[request_id] = Mode(params.mode).value
        self._commands.put(("add", request_id, prompt_ids, params, grammar, parent))
        self._wake.set()
        return self._iterate(request_id, stream)

    async def _iterate(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    finished = True  # the engine has already dropped it
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if finished:
                self._streams.pop(request_id, None)
                self._modes.pop(request_id, None)
            else:  # the client went away (or the handler failed): free its slot now
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Drop a submitted request whose outputs nobody will read (a stream closed early, or one
        never iterated: another prompt of its HTTP request was refused)."""
        self._streams.pop(request_id, None)
        mode = self._modes.pop(request_id, "unknown")
        self._commands.put(("abort", request_id, mode))
        self._wake.set()

    def _deliver(self, request_id: str, item: RequestOutput | Exception) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, request_id, prompt_ids, params, grammar, parent = cmd
                try:
                    self.engine.add_tokenized(request_id, prompt_ids, params, grammar=grammar, parent_id=parent)
                except (ValueError, QueueFull) as e:
                    self._deliver(request_id, e)
                except Exception as e:
                    logger.error("request %s could not be queued", request_id, exc_info=e)
                    self._deliver(request_id, EngineError(f"internal error: {type(e).__name__}: {e}"))
                finally:
                    with self._lock:  # queued (it holds its parent's place now) or refused
                        self._pending[parent] -= 1
                        if not self._pending[parent]:
                            del self._pending[parent]
            elif self.engine.abort_request(cmd[1]):
                self.metrics.requests.labels(cmd[2], "abort").inc()
                self.metrics.failed("client_disconnected")

    def _end_all(self, error: Exception) -> None:
        """Drop every request, running or waiting, and tell its client why."""
        ids = [r.request_id for r in self.engine.running()]
        ids += [r.request_id for r in self.engine.scheduler.waiting]
        for request_id in ids:
            self.engine.abort_request(request_id)
            self._deliver(request_id, error)

    def _beat(self) -> None:
        eng, m = self.engine, self.metrics
        self.status.running, self.status.waiting = eng.num_running, eng.num_waiting
        m.queue.set(self.status.waiting)
        m.running.set(self.status.running)
        m.kv_allocated.set(eng.num_kv_slots_allocated)
        m.prefix_queried.set(eng.pool.num_prefix_queries)
        m.prefix_hits.set(eng.pool.num_prefix_hits)
        m.preemptions.set(eng.num_preemptions)
        self.status.heartbeat = time.monotonic()

    def _failed(self, error: str) -> Exception:
        """What a client is told of its request failing inside the engine with `error`."""
        failure = self.worker_failure
        if failure is not None:
            return self._worker_dead(failure)
        return EngineError(f"internal error while serving this request ({error}); other requests are unaffected")

    def _run(self) -> None:
        while not self._stop:
            self._drain_commands()
            if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline:
                self._end_all(ShuttingDown("the server shut down before this request finished"))
            failure = self.worker_failure
            if failure is not None:  # nothing can run again: end what is queued, do not step
                if not self._failure_logged:
                    logger.error("%s; /health answers 503 and requests are refused", self._worker_dead(failure))
                    self._failure_logged = True
                self._end_all(self._worker_dead(failure))
            self._beat()
            if not self.engine.has_unfinished_requests():
                self._wake.wait(timeout=0.05)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # the engine isolates request failures; this is a bug in the loop itself
                logger.error("engine step failed", exc_info=e)
                failure = self.worker_failure
                error = EngineError(f"internal error: engine step failed: {type(e).__name__}")
                self._end_all(error if failure is None else self._worker_dead(failure))
                continue
            for out in outputs:
                if out.error is not None:  # counted by the HTTP layer, which knows if a stream had begun
                    failed = ValueError(out.error) if out.is_request_error else self._failed(out.error)
                    self._deliver(out.request_id, failed)
                    continue
                if out.finished:
                    self.metrics.finished(out)
                self._deliver(out.request_id, out)
