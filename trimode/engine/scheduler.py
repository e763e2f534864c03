"""Admission control for the engine: a bounded queue, a row limit and the KV pool's free pages.

Rows and queue places are shared fairly between parents (the client requests whose n samples, or
prompts, are engine requests of their own), not between engine requests: one request with n = 64
must not hold every row and queue place while a 4-token request behind it waits for all of them.
Admission picks the parent holding the fewest rows (first come, first served between equals), and
when every row is taken, a parent holding at least two rows more than a waiting one gives one up
(`to_preempt`; the preempted sample resumes exactly where it was, later).

Pure Python (no torch): what runs next is decided here, how it runs is the engine's business.
"""

from __future__ import annotations

from collections import Counter, deque

from trimode.engine.generate import Request
from trimode.kv_cache import num_pages


class QueueFull(Exception):
    """The waiting queue is at its limit: refuse the request (HTTP 429/503), do not buffer it."""


def kv_slots(req: Request) -> int:
    """KV slots a request may need at most: its prompt, its budget, and one pass of scratch."""
    return len(req.prompt_ids) + req.params.max_tokens + req.pass_width + 1


def parent_of(req: Request) -> str:
    """The client request `req` is a sample of (itself when it has no parent)."""
    return req.parent_id if req.parent_id is not None else req.request_id


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
        self._places: Counter[str] = Counter()  # parent -> its waiting requests; a parent takes one place

    @property
    def num_places(self) -> int:
        """Queue places taken: parents with a request waiting."""
        return len(self._places)

    def has_place(self, parent: str) -> bool:
        """Whether `parent` already holds a queue place (its next request needs none)."""
        return parent in self._places

    def check_fits(self, req: Request) -> None:
        """ValueError when the request could not run even alone in the KV pool."""
        if kv_slots(req) > self.kv_cache_tokens:
            raise ValueError(
                f"the request needs up to {kv_slots(req)} KV slots (prompt + max_tokens + one pass); the "
                f"engine's KV cache has {self.kv_cache_tokens}: lower max_tokens or shorten the prompt"
            )

    def add(self, req: Request) -> None:
        """Queue a request the engine has checked (`check_fits`). A request whose context is that
        of one of its parent's already waiting (n samples of a prompt, identical prompts of one
        `LLM.generate` call) is admitted after that one, whose prefill will have cached the
        context's full pages for it to share."""
        parent = parent_of(req)
        if parent not in self._places and len(self._places) >= self.max_queue:
            raise QueueFull(f"{len(self._places)} requests are waiting (max_queue={self.max_queue}); retry later")
        if not req.wants_prompt_logprobs:  # a scored prompt is fed whole anyway
            # The first such request of its parent: its siblings then go in together, one step
            # after it. Only a sibling: another client's identical prompt would otherwise wait for
            # that one's requests to be admitted, and with them for every row they hold.
            req.after = next(
                (w for w in self.waiting if parent_of(w) == parent and w.context_ids == req.context_ids), None
            )
        self.waiting.append(req)
        self._places[parent] += 1

    def add_preempted(self, req: Request) -> None:
        """A running request that lost its KV pages (or its row, to a parent holding fewer): it
        goes first among its parent's requests (it already holds a place, so the queue limit does
        not apply)."""
        self.waiting.appendleft(req)
        self._places[parent_of(req)] += 1

    def _unqueue(self, reqs: list[Request]) -> None:
        gone = {id(r) for r in reqs}
        self.waiting = deque(r for r in self.waiting if id(r) not in gone)
        for r in reqs:
            parent = parent_of(r)
            self._places[parent] -= 1
            if not self._places[parent]:
                del self._places[parent]

    def remove(self, request_id: str) -> Request | None:
        for req in self.waiting:
            if req.request_id == request_id:
                self._unqueue([req])
                return req
        return None

    def pages_to_start(self, req: Request) -> int:
        """Pages a request needs to be admitted: its context and one block of scratch (its decode
        then grows a page at a time; when the pool runs out, the engine preempts)."""
        return num_pages(len(req.context_ids) + req.pass_width + 1, self.page_size)

    def admit(self, running: list[Request], num_free_pages: int, max_prompt_tokens: int | None = None) -> list[Request]:
        """Waiting requests that fit now. Each pick is the next request (in queue order) of the
        parent holding the fewest rows, running or just admitted, so the samples of one request
        take turns with other requests instead of going in all before them. A pick that does not
        fit blocks the rest (so large requests are not starved). Each running row keeps one free
        page in reserve for its next step, so admitting does not force an immediate preemption.
        With `max_prompt_tokens`, the prompts together stay within it, except that the first is
        always admitted (a longer prompt is then prefilled in chunks)."""
        rows, free, tokens = len(running), num_free_pages, 0
        if not self.waiting or rows >= self.max_batch:
            return []
        held = Counter(parent_of(r) for r in running)
        queues: dict[str, deque[tuple[int, Request]]] = {}  # parent -> (queue position, request)
        for position, req in enumerate(self.waiting):
            queues.setdefault(parent_of(req), deque()).append((position, req))
        waiting = {id(w) for w in self.waiting}
        admitted: list[Request] = []
        while queues and rows < self.max_batch:
            parent = min(queues, key=lambda p: (held[p], queues[p][0][0]))
            req = queues[parent][0][1]
            if req.after is not None and id(req.after) in waiting:
                # It shares the pages that request's prefill is about to cache: its parent's
                # requests wait for the next prefill, the other parents' go on.
                del queues[parent]
                continue
            need = self.pages_to_start(req)
            if need + rows > free:
                break
            prompt = len(req.context_ids)
            if admitted and max_prompt_tokens is not None and tokens + prompt > max_prompt_tokens:
                break
            queues[parent].popleft()
            if not queues[parent]:
                del queues[parent]
            admitted.append(req)
            held[parent] += 1
            rows, free, tokens = rows + 1, free - need, tokens + prompt
        self._unqueue(admitted)
        return admitted

    def to_preempt(self, running: list[Request]) -> list[Request]:
        """Running requests to give their rows up to waiting parents: while every row is taken and
        the waiting parent holding the fewest rows holds at least two fewer than the parent holding
        the most, one of the latter's (the one with the least output to recompute). A newcomer then
        gets a row at the next prefill, not when a sample of a large n request finishes; parents
        holding one row each never preempt each other."""
        if len(running) < self.max_batch or not self.waiting:
            return []
        rows_of: dict[str, list[Request]] = {}
        for r in running:
            rows_of.setdefault(parent_of(r), []).append(r)
        held = Counter({p: len(rs) for p, rs in rows_of.items()})
        wanting = Counter(self._places)
        victims: list[Request] = []
        while wanting:
            taker = min(wanting, key=lambda p: held[p])
            giver = max(rows_of, key=lambda p: held[p])
            if held[giver] < held[taker] + 2:
                break
            victim = min(rows_of[giver], key=lambda r: (len(r.token_ids), -r.arrival))
            rows_of[giver].remove(victim)
            victims.append(victim)
            held[giver], held[taker] = held[giver] - 1, held[taker] + 1
            wanting[taker] -= 1
            if not wanting[taker]:
                del wanting[taker]
        return victims
