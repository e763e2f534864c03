"""Admission control for the engine: a bounded FIFO queue, a row limit and the KV pool's free pages.

Pure Python (no torch): what runs next is decided here, how it runs is the engine's business.
"""

from __future__ import annotations

from collections import deque

from trimode.engine.generate import Request
from trimode.kv_cache import num_pages


class QueueFull(Exception):
    """The waiting queue is at its limit: refuse the request (HTTP 429/503), do not buffer it."""


def kv_slots(req: Request) -> int:
    """KV slots a request may need at most: its prompt, its budget, and one block of scratch."""
    return len(req.prompt_ids) + req.params.max_tokens + req.params.block_length + 1


class Scheduler:
    def __init__(self, max_batch: int, max_queue: int, kv_cache_tokens: int, page_size: int) -> None:
        for name, value in (
            ("max_batch", max_batch),
            ("max_queue", max_queue),
            ("kv_cache_tokens", kv_cache_tokens),
            ("page_size", page_size),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1; got {value}")
        self.max_batch, self.max_queue, self.page_size = max_batch, max_queue, page_size
        self.kv_cache_tokens = num_pages(kv_cache_tokens, page_size) * page_size  # what the pool holds: whole pages
        self.waiting: deque[Request] = deque()

    def check_fits(self, req: Request) -> None:
        """ValueError when the request could not run even alone in the KV pool."""
        if kv_slots(req) > self.kv_cache_tokens:
            raise ValueError(
                f"the request needs up to {kv_slots(req)} KV slots (prompt + max_tokens + block); the "
                f"engine's KV cache has {self.kv_cache_tokens}: lower max_tokens or shorten the prompt"
            )

    def add(self, req: Request) -> None:
        """Queue a request the engine has checked (`check_fits`). A request whose context is that
        of one already waiting (n samples of a prompt, the choices of a multiple-choice question
        after one context) is admitted after that one, whose prefill will have cached the
        context's full pages for it to share."""
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue={self.max_queue}); retry later")
        if not req.wants_prompt_logprobs:  # a scored prompt is fed whole anyway
            # The first such request: its siblings then go in together, one step after it.
            req.after = next((w for w in self.waiting if w.context_ids == req.context_ids), None)
        self.waiting.append(req)

    def add_preempted(self, req: Request) -> None:
        """A running request that lost its KV pages: it goes first when pages are free again (it
        already holds a place, so the queue limit does not apply)."""
        self.waiting.appendleft(req)

    def remove(self, request_id: str) -> Request | None:
        for req in self.waiting:
            if req.request_id == request_id:
                self.waiting.remove(req)
                return req
        return None

    def pages_to_start(self, req: Request) -> int:
        """Pages a request needs to be admitted: its context and one block of scratch (its decode
        then grows a page at a time; when the pool runs out, the engine preempts)."""
        return num_pages(len(req.context_ids) + req.params.block_length + 1, self.page_size)

    def admit(self, num_running: int, num_free_pages: int, max_prompt_tokens: int | None = None) -> list[Request]:
        """Waiting requests that fit now, in arrival order (a request that does not fit blocks the
        ones behind it, so large requests are not starved). Each running row keeps one free page in
        reserve for its next step, so admitting does not force an immediate preemption. With
        `max_prompt_tokens`, the prompts together stay within it, except that the first is always
        admitted (a longer prompt is then prefilled in chunks)."""
        rows, free, tokens = num_running, num_free_pages, 0
        admitted: list[Request] = []
        while self.waiting and rows < self.max_batch:
            req = self.waiting[0]
            if req.after is not None and any(w is req.after for w in (*admitted, *self.waiting)):
                break  # it shares the pages that request's prefill is about to cache
            need = self.pages_to_start(req)
            if need + rows > free:
                break
            prompt = len(req.context_ids)
            if admitted and max_prompt_tokens is not None and tokens + prompt > max_prompt_tokens:
                break
            admitted.append(self.waiting.popleft())
            rows, free, tokens = rows + 1, free - need, tokens + prompt
        return admitted
