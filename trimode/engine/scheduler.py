"""The engine's step decisions (`Scheduler.schedule` -> `StepPlan`) and admission control: a
bounded queue, a row limit, a token budget per step and the KV pool's free pages.

Each step the engine shows the scheduler what runs (`RunningGroup`, `Prefilling`) and the pool's
page accounting (`PoolPages`); the scheduler decides, before anything runs, which requests give up
their pages (to make room, or a row to a parent holding fewer), what leads the step (newcomers'
prefill, a long prompt's next chunk, or a running group's pass) and which groups ride with it. The
engine carries the plan out. Pages a preemption frees are counted exactly: a page frees when the
last row referencing it lets go.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from trimode.config import EngineConfig
from trimode.engine.auto import AutoPolicy, Choice
from trimode.engine.request import Request
from trimode.kv_cache import KVPoolExhausted, num_pages


class QueueFull(Exception):
    """The waiting queue is at its limit: refuse the request (HTTP 429/503), do not buffer it."""


@dataclass(frozen=True)
class RunningGroup:
    """What the scheduler sees of a running decode group: its rows, the pages each holds and its
    next pass allocates, whether a preempted row resumes with its last token committed
    (`Decoder.pending_commit`), its forward time per row so far and the tokens a row feeds per
    pass; for a group holding mode-auto rows, the exact decoding they run and which rows are
    between cycles (`Decoder.at_boundary`), free to move to another."""

    key: tuple
    requests: tuple[Request, ...]
    pages: tuple[Sequence[int], ...]  # per row, its page table (read, never changed, by the scheduler)
    need: tuple[int, ...]
    pending_commit: tuple[bool, ...]
    vtime: float
    width: int
    choice: Choice | None = None
    boundary: tuple[bool, ...] = ()

    @property
    def rides(self) -> bool:
        """Its pass feeds one token per row (AR): it rides beside any lead, outside the budget."""
        return self.width == 1

    @property
    def tokens(self) -> int:
        return self.width * len(self.requests)


@dataclass(frozen=True)
class Move:
    """Mode auto: rows `rows` of group `key` decode as `choice` from this step on."""

    key: tuple
    rows: tuple[int, ...]
    choice: Choice


@dataclass(frozen=True)
class Prefilling:
    """A prompt being prefilled a chunk per step: the pages it holds, and those its next chunk
    allocates."""

    request: Request
    pages: Sequence[int]
    need: int


@dataclass(frozen=True)
class PoolPages:
    """The KV pool's page accounting: pages an allocation may take now, and each page's readers."""

    free: int
    refs: Sequence[int]


@dataclass(frozen=True)
class StepPlan:
    """One engine step, decided before it runs. A plan with `moves` does only that: mode-auto rows
    move to the decoding the policy picks, and the step's forward is planned on the groups they
    form. Otherwise first the preemptions, in order, each with why; then the lead: newcomers
    prefilled together (`prefill`, the auto ones decoding as `first` says; one longer than the
    step's budget starts a chunked prefill, `chunked`), a chunked prompt's next chunk (`chunk`),
    or a running group's pass (`lead`); then the groups whose passes ride in the same forward."""

    moves: tuple[Move, ...] = ()
    preempt: tuple[tuple[Request, str], ...] = ()
    prefill: tuple[Request, ...] = ()
    first: tuple[tuple[Request, Choice], ...] = ()  # admitted auto requests, each with its decoding
    chunked: bool = False
    chunk: Request | None = None
    lead: tuple | None = None
    riders: tuple[tuple, ...] = ()

    @property
    def prefills(self) -> bool:
        """Whether the step feeds prompt tokens (newcomers, or a chunk)."""
        return bool(self.prefill) or self.chunk is not None


@dataclass
class _Simulated:
    """Running state while a plan is made: who still runs, and the pool's free pages and readers
    as the plan's preemptions leave them."""

    groups: list[RunningGroup]
    prefilling: list[Prefilling]
    free: int
    refs: Sequence[int]  # the pool's readers per page, before the plan's preemptions
    dropped: Counter[int] = field(default_factory=Counter)  # readers the plan's preemptions took away
    preempt: list[tuple[Request, str]] = field(default_factory=list)

    def running(self) -> list[Request]:
        return [r for g in self.groups for r in g.requests] + [p.request for p in self.prefilling]

    def group(self, key: tuple) -> RunningGroup | None:
        return next((g for g in self.groups if g.key == key), None)

    def drop(self, req: Request, why: str) -> bool | None:
        """Preempt `req`; returns whether its row had a pending commit (what it resumes from), or
        None for a prompt mid-prefill (it starts that prefill again, from where it started)."""
        for i, g in enumerate(self.groups):
            if req in g.requests:
                row = g.requests.index(req)
                self._release(g.pages[row])
                keep = [j for j in range(len(g.requests)) if j != row]
                self.groups[i] = RunningGroup(
                    g.key,
                    tuple(g.requests[j] for j in keep),
                    tuple(g.pages[j] for j in keep),
                    tuple(g.need[j] for j in keep),
                    tuple(g.pending_commit[j] for j in keep),
                    g.vtime,
                    g.width,
                    g.choice,
                    tuple(g.boundary[j] for j in keep) if g.boundary else (),
                )
                if not keep:
                    del self.groups[i]
                self.preempt.append((req, why))
                return g.pending_commit[row]
        job = next(p for p in self.prefilling if p.request is req)
        self._release(job.pages)
        self.prefilling.remove(job)
        self.preempt.append((req, why))
        return None

    def _release(self, pages: Sequence[int]) -> None:
        for page in pages:
            self.dropped[page] += 1
            if self.refs[page] == self.dropped[page]:
                self.free += 1


def kv_slots(req: Request) -> int:
    """KV slots a request may need at most: its prompt, its budget, and one pass of scratch."""
    return len(req.prompt_ids) + req.params.max_tokens + req.pass_width + 1


def auto_class(req: Request) -> bool | None:
    """Which load of mode-auto rows `req` counts in (its `auto_lossy`: diffusion allowed or not);
    None when it is not an auto request."""
    return req.params.auto_lossy if req.is_auto else None


def parent_of(req: Request) -> str:
    """The client request `req` is a sample of (itself when it has no parent)."""
    return req.parent_id if req.parent_id is not None else req.request_id


class Scheduler:
    def __init__(self, config: EngineConfig) -> None:
        """`config` (validated there): the batch and queue bounds, the KV pool's size in whole pages,
        `max_num_batched_tokens` (prompt tokens per prefill step) and `decode_tokens` (the tokens a
        step's block-mode passes feed together; AR rows ride beyond it)."""
        self.max_batch, self.max_queue, self.page_size = config.max_batch, config.max_queue, config.page_size
        self.kv_cache_tokens = num_pages(config.kv_cache_tokens, config.page_size) * config.page_size
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_decode_tokens = config.decode_tokens
        self.waiting: deque[Request] = deque()
        self._places: Counter[str] = Counter()  # parent -> its waiting requests; a parent takes one place
        # Turns: a step after a prefill step runs a group's pass (TTFT without starving decode),
        # and a chunked prompt's chunks alternate with newcomers' prefills.
        self._prefilled_last = False
        self._chunk_turn = False
        self._moved = False  # the last plan moved rows: this one plans the step's forward on them

    def schedule(
        self,
        groups: list[RunningGroup],
        prefilling: list[Prefilling],
        pool: PoolPages,
        fuses_parts: bool,
        policy: AutoPolicy | None = None,
    ) -> StepPlan:
        """The next step. Mode-auto rows between cycles first move to the decoding `policy` picks
        for the auto load (a plan of moves only). Then the lead is a prefill or one running
        group's pass (the group with the least forward time per row so far), alternating while
        there is prefill work: a newcomer's first token returns after its prefill instead of after
        the running batches' decode (TTFT). Newcomers whose prompts fit `max_num_batched_tokens` go
        together; a longer prompt is fed a chunk per prefill step, taking turns with newcomers, so
        it never stalls the others. Other groups ride in the lead's forward when parts fuse
        (`fuses_parts`: eager forwards): those whose pass feeds one token per row (AR) in every
        step, block-mode ones beside a pass while the step's block tokens stay within
        `max_decode_tokens`; while only AR groups run, every step with prefill work then prefills,
        since their rows advance in it anyway. A lead whose pages are not free first preempts the
        most recently arrived requests."""
        moves = () if self._moved else self._moves(groups, prefilling, policy)
        self._moved = bool(moves)
        if moves:
            return StepPlan(moves)
        sim = _Simulated(list(groups), list(prefilling), pool.free, pool.refs)
        if not self._prefilled_last or (fuses_parts and all(g.rides for g in groups)):
            plan = self._plan_prefill(sim, fuses_parts, policy)
            if plan is not None:
                self._prefilled_last = True
                return plan
        self._prefilled_last = False
        lead = min(sim.groups, key=lambda g: g.vtime).key if sim.groups else None
        if lead is None:
            return StepPlan(preempt=tuple(sim.preempt))

        def need() -> int:
            group = sim.group(lead)
            return sum(group.need) if group is not None else 0

        self._make_room(sim, need)
        group = sim.group(lead)
        if group is None:  # it gave its own rows up
            return StepPlan(preempt=tuple(sim.preempt))
        room = self.max_decode_tokens - (0 if group.rides else group.tokens)
        riders = self._riders(sim, {lead}, need(), fuses_parts, room)
        return StepPlan(preempt=tuple(sim.preempt), lead=lead, riders=riders)

    def _auto_choice(
        self,
        groups: list[RunningGroup],
        prefilling: list[Prefilling],
        policy: AutoPolicy,
        lossy: bool,
        admitted: Sequence[Request] = (),
    ) -> Choice:
        """The decoding `policy` picks for one class of auto rows (`lossy`: those that opted in to
        diffusion, `SamplingParams.auto_lossy`), by their load: running, being prefilled,
        `admitted` and waiting (rows their groups are about to hold), staying on what most of the
        running ones decode as unless another is clearly faster."""
        counts: Counter[Choice] = Counter()
        for g in groups:
            if g.choice is not None:
                counts[g.choice] += sum(auto_class(r) == lossy for r in g.requests)
        rows = [r for g in groups for r in g.requests] + list(admitted) + [p.request for p in prefilling]
        rows = [r for r in rows + list(self.waiting) if auto_class(r) == lossy]
        left = [r.params.max_tokens - len(r.token_ids) for r in rows]
        current = next((c for c, n in counts.most_common(1) if n), None)
        return policy.choose(len(rows), current, self.max_decode_tokens, lossy, left)

    def _moves(
        self, groups: list[RunningGroup], prefilling: list[Prefilling], policy: AutoPolicy | None
    ) -> tuple[Move, ...]:
        """Mode auto: the rows between cycles of groups whose auto rows decode other than the
        policy's pick for their class. Every exact decoding keeps AR's KV prefix and emits AR's
        tokens, so a move loses only drafts not yet verified; a lossy row may move into diffusion
        the same way (its prefix is all it reads), but never out of it (`at_boundary`). The plan
        after a move never moves (`_moved`), so every step runs a forward whatever the policy says."""
        if policy is None or all(g.choice is None for g in groups):
            return ()
        moves = []
        for lossy in (False, True):
            if not any(auto_class(r) == lossy for g in groups for r in g.requests):
                continue
            choice = self._auto_choice(groups, prefilling, policy, lossy)
            for g in groups:
                if g.choice is None or g.choice == choice:
                    continue
                free = zip(g.requests, g.boundary)
                rows = tuple(i for i, (r, ok) in enumerate(free) if ok and auto_class(r) == lossy)
                if rows:
                    moves.append(Move(g.key, rows, choice))
        return tuple(moves)

    def _plan_prefill(self, sim: _Simulated, fuses_parts: bool, policy: AutoPolicy | None) -> StepPlan | None:
        """A prefill step, or None when there is nothing to prefill (the fairness preemptions it
        decided stay in `sim`). Admitted auto requests get their first decoding (their prefill
        drafts for them if it is quadratic self-spec)."""
        if sim.prefilling and (self._chunk_turn or not self.waiting):
            self._chunk_turn = False
            return self._plan_chunk(sim, sim.prefilling[0].request, fuses_parts)
        self._chunk_turn = True
        for req in self.to_preempt(sim.running()):  # a parent holding most rows gives one up
            self._preempt(sim, req, "its row went to a request holding fewer")
        admitted = self.admit(sim.running(), sim.free, self.max_num_batched_tokens)
        if not admitted:
            return self._plan_chunk(sim, sim.prefilling[0].request, fuses_parts) if sim.prefilling else None
        first = []
        new = [r for r in admitted if r.is_auto and r.decoding is None]
        if policy is not None:
            for lossy in {auto_class(r) for r in new}:
                choice = self._auto_choice(sim.groups, sim.prefilling, policy, bool(lossy), admitted)
                first += [(r, choice) for r in new if auto_class(r) == lossy]
        preempt, prefill = tuple(sim.preempt), tuple(admitted)
        budget = self.max_num_batched_tokens
        if len(admitted[0].context_ids) > budget:  # admitted alone: chunk it
            return StepPlan(preempt=preempt, prefill=prefill, first=tuple(first), chunked=True)
        pages = sum(num_pages(len(r.context_ids) + r.prefill_tail, self.page_size) for r in admitted)
        riders = self._riders(sim, set(), pages, fuses_parts, 0)
        return StepPlan(preempt=preempt, prefill=prefill, first=tuple(first), riders=riders)

    def _plan_chunk(self, sim: _Simulated, req: Request, fuses_parts: bool) -> StepPlan:
        def need() -> int:
            return next((p.need for p in sim.prefilling if p.request is req), 0)

        self._make_room(sim, need)
        if all(p.request is not req for p in sim.prefilling):  # it gave its own pages up
            return StepPlan(preempt=tuple(sim.preempt))
        return StepPlan(preempt=tuple(sim.preempt), chunk=req, riders=self._riders(sim, set(), need(), fuses_parts, 0))

    def _make_room(self, sim: _Simulated, need: Callable[[], int]) -> None:
        """Preempt the most recently arrived running requests until `need()` pages are free
        (vLLM's recompute preemption: the oldest requests keep making progress)."""
        while need() > sim.free:
            running = sim.running()
            if not running:  # cannot happen: a request is refused unless it fits the pool alone
                pool = self.kv_cache_tokens // self.page_size
                raise KVPoolExhausted(f"{need()} KV pages needed, the pool has {pool}")
            self._preempt(sim, max(running, key=lambda r: r.arrival), "KV pool full")

    def _preempt(self, sim: _Simulated, req: Request, why: str) -> None:
        """`req` gives its pages up; it resumes where it was when it is admitted again."""
        pending = sim.drop(req, why)
        if pending is not None:
            req.preempt(pending)
        self.add_preempted(req)

    def _riders(
        self, sim: _Simulated, taken: set[tuple], lead_pages: int, fuses_parts: bool, room: int
    ) -> tuple[tuple, ...]:
        """The groups other than the lead that ride in its forward, whose pages are free: every
        group whose pass feeds one token per row (AR), and block-mode groups (least forward time
        first) while their tokens fit `room`. An AR row adds a few percent to another pass's
        matrix products, where a forward of its own would cost mostly per-forward overhead on a
        CPU (and a weight read on a GPU), so it gets a token every step instead of waiting for the
        block passes; block groups that fit the step's budget together (rows of one decoding split
        by an earlier budget, or different decodings) share one forward instead of taking turns.
        Compiled one-part forwards take no riders: a rider would make the lead's forward eager,
        which is slower than the riders' own compiled step (a mixed AR + self-spec batch of 8 on
        this CPU: 1.7x and 2.3x the tokens/s without riders, in two interleaved runs)."""
        if not fuses_parts:
            return ()
        free = sim.free - lead_pages
        riders = []
        for g in sorted(sim.groups, key=lambda g: g.vtime):
            if g.key in taken or sum(g.need) > free or (not g.rides and g.tokens > room):
                continue
            free -= sum(g.need)
            room -= 0 if g.rides else g.tokens
            riders.append(g.key)
        return tuple(riders)

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
