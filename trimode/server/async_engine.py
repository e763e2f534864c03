"""The engine on its own thread, fed by the server's event loop.

The event loop validates and tokenizes a request, then hands it over through a command queue; the
engine thread drains commands between steps, runs `step()`, and pushes each request's outputs into
that request's asyncio queue. Aborts (client gone) take effect before the next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from trimode.engine.generate import Request
from trimode.engine.llm_engine import LLMEngine, RequestOutput
from trimode.engine.scheduler import QueueFull, kv_slots
from trimode.sampling_params import SamplingParams

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("trimode_requests", "Finished requests", ["mode", "status"], registry=r)
        self.tokens = Counter("trimode_generated_tokens", "Generated tokens", ["mode"], registry=r)
        self.forwards = Counter("trimode_forwards", "Forwards taken part in", ["mode"], registry=r)
        self.tpf = Gauge("trimode_tokens_per_forward", "Generated tokens / forwards since start", ["mode"], registry=r)
        self.queue = Gauge("trimode_queue_depth", "Requests waiting", registry=r)
        self.running = Gauge("trimode_running_batch", "Requests running", registry=r)
        self.ttft = Histogram("trimode_time_to_first_token_seconds", "TTFT", ["mode"], buckets=LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("trimode_inter_token_latency_seconds", "Mean time per output token after the first",
                             ["mode"], buckets=LATENCY_BUCKETS, registry=r)
        self._totals: dict[str, list[int]] = {}

    def finished(self, out: RequestOutput) -> None:
        res = out.output
        if res is None:
            return
        self.requests.labels(res.mode, res.finish_reason).inc()
        self.tokens.labels(res.mode).inc(res.num_generated_tokens)
        self.forwards.labels(res.mode).inc(res.num_forwards)
        totals = self._totals.setdefault(res.mode, [0, 0])
        totals[0] += res.num_generated_tokens
        totals[1] += res.num_forwards
        self.tpf.labels(res.mode).set(totals[0] / max(totals[1], 1))
        self.ttft.labels(res.mode).observe(res.time_to_first_token)
        if res.num_generated_tokens > 1:
            self.itl.labels(res.mode).observe(res.inter_token_latency)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_queue: int) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = Metrics()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._modes: dict[str, str] = {}  # request id -> mode, for the abort counter
        self._pending = 0  # handed over, not yet in the engine's queue
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._counter = 0
        self._thread = threading.Thread(target=self._run, name="trimode-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    def new_request_id(self, prefix: str) -> str:
        with self._lock:
            self._counter += 1
            return f"{prefix}-{self._counter}"

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Validate (ValueError), check the queue (QueueFull), then stream the request's outputs."""
        llm = self.engine.llm
        llm.check_fits(prompt_ids, params)
        need = kv_slots(Request(None, prompt_ids, params))
        if need > self.engine.scheduler.max_kv_tokens:
            raise ValueError(f"the request needs {need} KV slots; the server has {self.engine.scheduler.max_kv_tokens}:"
                             " lower max_tokens")
        with self._lock:
            if self.engine.num_waiting + self._pending >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting); retry later")
            self._pending += 1
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        self._modes[request_id] = params.mode.value
        self._commands.put(("add", request_id, prompt_ids, params))
        self._wake.set()
        return self._iterate(request_id, stream)

    async def _iterate(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            mode = self._modes.pop(request_id, "unknown")
            if not finished:  # the client went away (or the handler failed): free its slot now
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
                _, request_id, prompt_ids, params = cmd
                with self._lock:
                    self._pending -= 1
                    try:
                        self.engine.add_request(request_id, prompt_ids, params)
                    except (ValueError, QueueFull) as e:
                        self._deliver(request_id, e)
            elif self.engine.abort_request(cmd[1]):
                self.metrics.requests.labels(cmd[2], "abort").inc()

    def _run(self) -> None:
        while not self._stop:
            self._drain_commands()
            self.metrics.queue.set(self.engine.num_waiting)
            self.metrics.running.set(self.engine.num_running)
            if not self.engine.has_unfinished_requests():
                self._wake.wait(timeout=0.05)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug, not user input: fail the running requests, keep serving
                for group in list(self.engine.groups.values()):
                    for req in list(group.requests):
                        self.engine.abort_request(req.request_id)
                        self._deliver(req.request_id, RuntimeError(f"engine step failed: {e}"))
                time.sleep(0.01)
                continue
            for out in outputs:
                if out.finished:
                    self.metrics.finished(out)
                self._deliver(out.request_id, out)
