"""Admission control for the engine: a bounded FIFO queue, a row limit and a KV-token budget.

Pure Python (no torch): what runs next is decided here, how it runs is the engine's business.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from trimode.engine.generate import Request


class QueueFull(Exception):
    """The waiting queue is at its limit: refuse the request (HTTP 429/503), do not buffer it."""


def kv_slots(req: Request) -> int:
    """KV slots a request may need: its prompt, its budget, and one block of scratch."""
    return len(req.prompt_ids) + req.params.max_tokens + req.params.block_length + 1


class Scheduler:
    def __init__(self, max_batch: int, max_queue: int, max_kv_tokens: int) -> None:
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("max_kv_tokens", max_kv_tokens)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1; got {value}")
        self.max_batch, self.max_queue, self.max_kv_tokens = max_batch, max_queue, max_kv_tokens
        self.waiting: deque[Request] = deque()

    def add(self, req: Request) -> None:
        if kv_slots(req) > self.max_kv_tokens:
            raise ValueError(
                f"the request needs {kv_slots(req)} KV slots (prompt + max_tokens + block); the engine "
                f"has {self.max_kv_tokens}: lower max_tokens or shorten the prompt"
            )
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue={self.max_queue}); retry later")
        self.waiting.append(req)

    def remove(self, request_id: str) -> Request | None:
        for req in self.waiting:
            if req.request_id == request_id:
                self.waiting.remove(req)
                return req
        return None

    def admit(self, running: Iterable[Request], max_prompt_tokens: int | None = None) -> list[Request]:
        """Waiting requests that fit now, in arrival order (a request that does not fit blocks the
        ones behind it, so large requests are not starved). With `max_prompt_tokens`, their prompts
        together stay within it, except that the first is always admitted (a longer prompt is then
        prefilled in chunks)."""
        running = list(running)
        rows, used, tokens = len(running), sum(kv_slots(r) for r in running), 0
        admitted: list[Request] = []
        while self.waiting and rows < self.max_batch and used + kv_slots(self.waiting[0]) <= self.max_kv_tokens:
            prompt = len(self.waiting[0].prompt_ids)
            if admitted and max_prompt_tokens is not None and tokens + prompt > max_prompt_tokens:
                break
            req = self.waiting.popleft()
            admitted.append(req)
            rows, used, tokens = rows + 1, used + kv_slots(req), tokens + prompt
        return admitted
