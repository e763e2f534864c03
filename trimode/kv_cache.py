"""The one owner of KV memory and of position arithmetic: a paged pool and per-batch page tables.

`KVPool` is allocated once, from a token budget: K and V as one (slots, H_kv, D) tensor per layer,
slots = pages x page_size, with a free list, per-page reference counts and a prefix cache. A
`KVCache` is one decode batch's view of it: per row, a page table (host list of page ids) and the
length of its clean, causally computed prefix (host ints: the engine knows them, nothing is read
back from the device to plan a pass). Rows joining or leaving a batch move page ids, never K/V.

Every forward writes its new K/V into the slots right after each row's prefix, positions
[length, length + T); whether they become part of the prefix is decided afterwards by `commit`
(advance by T, or by a per-row count after verification; a crop returns whole pages past the new
length and the next pass's scratch). A pass that must not write the cache (diffusion denoise,
self-spec draft) commits nothing: its slots are scratch, invisible behind `lengths`, overwritten by
the next pass. So "read-only attach", "write" and "write then crop" are one mechanism.

Prefix caching (automatic): a full page of prompt tokens is registered under its tokens and the
page before it, so a later request whose context starts with the same pages reuses them (reference
counted; a page nobody reads stays cached until its memory is needed, least recently used first).
Shared pages lie wholly inside every sharer's prefix, and writes only ever go past a row's prefix,
so a shared page is never written.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Final, Literal

import torch

PAGE_SIZE = 16  # KV slots per page unless configured otherwise

# What a pass's attention is told (`KVCache.attention_mask`): a bool mask, True = attend, broadcast
# to (B, 1, T, S); None, every key visible; or CAUSAL, causal attention of a pass over itself with
# no prefix, which SDPA runs as is_causal=True (its own kernels, no mask in memory).
CAUSAL: Final = "causal"
Mask = torch.Tensor | Literal["causal"] | None


class KVPoolExhausted(RuntimeError):
    """No free page left: the engine preempts a request before this can happen."""


def num_pages(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class KVPool:
    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"the KV pool needs >= 1 page of >= 1 slot; got {num_pages} pages of {page_size}")
        # One page more than the budget: `trash`, never allocated, where right-padded positions of a
        # batched prefill write and what pad entries of a page table point at.
        shape = ((num_pages + 1) * page_size, num_kv_heads, head_dim)
        # Zeros, not empty: a masked key still multiplies its value by 0, and 0 * NaN garbage is NaN.
        # A tensor per layer, not one (layers, ...) tensor: a compiled graph writes each in place,
        # where writes to views of one input would be functionalised into copies of all of it.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.device = torch.device(device)
        self.num_pages, self.page_size, self.trash = num_pages, page_size, num_pages
        self.refs = [0] * num_pages
        self.free: deque[int] = deque(range(num_pages))  # unreferenced and uncached
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; least recent first
        self._cached: dict[tuple[int, tuple[int, ...]], int] = {}  # (parent key id, tokens) -> page
        self._key_of: dict[int, tuple[tuple[int, tuple[int, ...]], int]] = {}  # page -> (its key, its key id)
        self._next_key_id = 1  # key ids are never reused, so an evicted parent orphans its children
        self.num_prefix_queries = 0  # context tokens looked up
        self.num_prefix_hits = 0  # of which found in the cache

    @property
    def num_tokens(self) -> int:
        return self.num_pages * self.page_size

    @property
    def num_bytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in self.k + self.v)

    @property
    def num_free_pages(self) -> int:
        """Pages an allocation may take: free ones and cached ones nobody reads."""
        return len(self.free) + len(self.evictable)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - self.num_free_pages

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free_pages:
            raise KVPoolExhausted(f"need {n} KV pages, {self.num_free_pages} of {self.num_pages} are free")
        pages = []
        for _ in range(n):
            if self.free:
                page = self.free.popleft()
            else:
                page, _ = self.evictable.popitem(last=False)
                key, _ = self._key_of.pop(page)
                del self._cached[key]
            self.refs[page] = 1
            pages.append(page)
        return pages

    def release(self, pages: list[int]) -> None:
        for page in pages:
            self.refs[page] -= 1
            if self.refs[page] == 0:
                if page in self._key_of:
                    self.evictable[page] = None
                else:
                    self.free.append(page)

    def match_prefix(self, tokens: list[int]) -> list[int]:
        """Cached pages holding the longest run of `tokens`' leading full pages, now referenced by
        the caller. The last token is never matched: a prefill must compute at least one position."""
        pages: list[int] = []
        parent = 0
        p = self.page_size
        for start in range(0, len(tokens) - p, p):
            page = self._cached.get((parent, tuple(tokens[start : start + p])))
            if page is None:
                break
            if self.refs[page] == 0:
                del self.evictable[page]
            self.refs[page] += 1
            pages.append(page)
            parent = self._key_of[page][1]
        self.num_prefix_queries += len(tokens)
        self.num_prefix_hits += len(pages) * p
        return pages

    def register(self, tokens: list[int], pages: list[int]) -> None:
        """Make `pages` (holding `tokens` from position 0) findable by `match_prefix`, full pages only."""
        parent = 0
        p = self.page_size
        for i in range(len(tokens) // p):
            key = (parent, tuple(tokens[i * p : (i + 1) * p]))
            page = self._cached.get(key)
            if page is None:
                page = pages[i]
                if page in self._key_of:  # already cached under another key: the chain ends here
                    return
                self._cached[key] = page
                self._key_of[page] = (key, self._next_key_id)
                self._next_key_id += 1
            parent = self._key_of[page][1]


@dataclass
class KVView:
    """What one pass reads and writes of the pool, as tensors only (so a compiled graph can take
    it): where its new K/V go and which slots its keys are."""

    k: list[torch.Tensor]  # the pool's, per layer (slots, H, D)
    v: list[torch.Tensor]
    write_slots: torch.Tensor  # (B*T,) slot of each new token, in (B, T) order
    key_slots: torch.Tensor  # (B*S,) slot of each key position of each row
    run: tuple[int, int] | None = None  # the key slots, when they are one run [start, end) (batch 1)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this pass's k, v (B, H, T, D); return this layer's keys/values (B, H, S, D),
        gathered from the rows' pages."""
        b, h, t, d = k.shape
        pk, pv = self.k[layer], self.v[layer]
        new_k, new_v = (x.transpose(1, 2).reshape(b * t, h, d) for x in (k, v))
        pk.index_copy_(0, self.write_slots, new_k)
        pv.index_copy_(0, self.write_slots, new_v)
        if self.run is not None:
            start, end = self.run
            return pk[start:end].transpose(0, 1)[None], pv[start:end].transpose(0, 1)[None]
        # index_select over the flat (B*S,) slots: ~6x faster on CPU than indexing with the (B, S) map.
        shape = (b, self.key_slots.numel() // b, h, d)
        keys = pk.index_select(0, self.key_slots).view(shape)
        values = pv.index_select(0, self.key_slots).view(shape)
        return keys.transpose(1, 2), values.transpose(1, 2)


class KVCache:
    """One batch's rows over a `KVPool`: page tables and prefix lengths (host), positions and the
    attention pattern of each pass."""

    def __init__(self, pool: KVPool, rows: int = 0) -> None:
        self.pool = pool
        self.pages: list[list[int]] = [[] for _ in range(rows)]
        self.lengths: list[int] = [0] * rows
        self._pending: int | None = None  # T of the last forward, until it is committed or discarded
        self.view: KVView | None = None  # what the pending pass reads and writes
        self._pass_lengths: torch.Tensor | None = None  # (B,) `lengths` of the pending pass, on the device

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def num_allocated_pages(self) -> int:
        return sum(len(p) for p in self.pages)

    def pages_needed(self, num_tokens: int | list[int]) -> int:
        """New pages a forward of `num_tokens` per row (one count, or one per row) would allocate."""
        return sum(self.row_pages_needed(num_tokens))

    def row_pages_needed(self, num_tokens: int | list[int]) -> list[int]:
        """`pages_needed`, per row."""
        p, fed = self.pool.page_size, num_tokens if isinstance(num_tokens, list) else [num_tokens] * self.batch_size
        return [max(0, num_pages(n + f, p) - len(pages)) for n, f, pages in zip(self.lengths, fed, self.pages)]

    def add_row(self, context: list[int]) -> int:
        """A new empty row; the longest cached prefix of `context` becomes its prefix. Returns the
        number of context tokens found cached."""
        pages = self.pool.match_prefix(context)
        self.pages.append(pages)
        self.lengths.append(len(pages) * self.pool.page_size)
        return self.lengths[-1]

    def register_prefix(self, row: int, context: list[int]) -> None:
        """Offer row `row`'s pages, which hold `context` (as far as its prefix reaches: tokens past
        a stop string may lie beyond `context`), to later requests (prefix caching)."""
        self.pool.register(context[: self.lengths[row]], self.pages[row])

    def begin(
        self,
        num_tokens: int,
        num_fed: list[int] | None = None,
        gather: bool = False,
        offsets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Prepare a forward of `num_tokens` new tokens per row: allocate the pages it writes and
        set `view`. `num_fed`: per row, how many of them are real (a right-padded prefill); pad
        positions write to the pool's trash page, so a short row beside a long one takes only its
        own pages. `gather`: always gather the keys (a compiled graph cannot take `run`'s ints).
        `offsets` (T,): each new token's position after the row's prefix, where it is not its slot
        (a pass laying several continuations side by side); default 0..T-1. Slots stay 0..T-1.

        Returns (positions (B, T), number of key slots S the pass attends over)."""
        p, trash = self.pool.page_size, self.pool.trash
        fed = num_fed or [num_tokens] * self.batch_size
        for row, (n, f) in enumerate(zip(self.lengths, fed)):
            missing = num_pages(n + f, p) - len(self.pages[row])
            if missing > 0:
                self.pages[row] += self.pool.allocate(missing)
        span = max(self.lengths) + num_tokens
        device = self.pool.device
        width = num_pages(span, p)
        table = torch.tensor(
            [pages[:width] + [trash] * (width - len(pages[:width])) for pages in self.pages], device=device
        )
        keys = torch.arange(span, device=device)
        # (B, S): slot of key position j of row b; past a row's pages, the trash page (only ever
        # written by pad positions and read by masked-out keys).
        key_slots = table[:, keys // p] * p + keys % p
        # (B,) on the device, once per pass: positions here, the attention mask next.
        self._pass_lengths = torch.tensor(self.lengths, dtype=torch.long, device=device)
        slots = self._pass_lengths[:, None] + torch.arange(num_tokens, device=device)
        positions = slots if offsets is None else self._pass_lengths[:, None] + offsets.to(device)
        # One row on consecutive pages (batch 1, a chunked prefill on a fresh pool): its keys are a
        # slice of the pool, read in place instead of gathered.
        first = self.pages[0][0]
        consecutive = self.batch_size == 1 and self.pages[0][:width] == list(range(first, first + width))
        run = (first * p, first * p + span) if consecutive and not gather else None
        write_slots = key_slots.gather(1, slots).flatten()
        self.view = KVView(self.pool.k, self.pool.v, write_slots, key_slots.flatten(), run)
        self._pending = num_tokens
        return positions, span

    def attention_mask(
        self,
        num_tokens: int,
        span: int,
        causal: torch.Tensor | bool,
        dense: bool = False,
        pattern: torch.Tensor | None = None,
    ) -> Mask:
        """What SDPA's attn_mask gets. Key j is visible to query i of row b iff
        j < lengths[b] + (i + 1 if causal else T): the whole clean prefix, plus the new tokens
        causally or bidirectionally (`causal`: one value, or one per row (B,)). `pattern` (T, T),
        or per row (B, T, T), bool, when given, replaces the second part: new token i sees new
        token j iff pattern[(b,) i, j].
        Scratch slots past that are never visible. Rows of one length with one pattern need no
        per-row mask: none at all, CAUSAL for a causal pass with no prefix, or one lower-right causal
        (1, 1, T, S) mask shared by the rows; otherwise, or when `dense`, a (B, 1, T, S) bool mask,
        True = attend. Called after `begin`, whose lengths it reads."""
        device = self.pool.device
        if pattern is not None:
            assert self._pass_lengths is not None, "attention_mask() before begin()"
            # (B, S): key j's index among the row's new tokens (negative: its prefix).
            new = torch.arange(span, device=device)[None] - self._pass_lengths[:, None]
            rows = pattern.to(device).expand(self.batch_size, num_tokens, num_tokens)
            index = new.clamp(0, num_tokens - 1)[:, None].expand(-1, num_tokens, -1)
            sees = rows.gather(2, index)  # (B, T, S)
            inside = (new >= 0) & (new < num_tokens)
            return ((new < 0)[:, None] | (inside[:, None] & sees))[:, None]
        if isinstance(causal, bool) and len(set(self.lengths)) == 1 and not dense:
            if not causal or num_tokens == 1:
                return None
            if num_tokens == span:
                return CAUSAL
            # Lower-right causal. torch's CausalBias would say the same without a tensor, but on a
            # CPU it materialises this very mask (bit-identical outputs), on a GPU its kernels take
            # no enable_gqa, and importing it imports torch._dynamo (a second per process start).
            keys, queries = torch.arange(span, device=device), torch.arange(num_tokens, device=device)
            return (keys[None] <= queries[:, None] + span - num_tokens)[None, None]
        lengths = self._pass_lengths
        assert lengths is not None, "attention_mask() before begin()"
        keys = torch.arange(span, device=device)
        steps = torch.arange(1, num_tokens + 1, device=device)
        if isinstance(causal, torch.Tensor):
            limit = lengths[:, None] + torch.where(causal.to(device)[:, None], steps, num_tokens)
        else:
            limit = lengths[:, None] + (steps if causal else num_tokens)
        return (keys[None, None, :] < limit[:, :, None])[:, None]

    def commit(self, counts: list[int] | None = None, keep_scratch: bool = True) -> None:
        """Make the last pass's first `counts[b]` tokens (all T when None) part of row b's prefix.
        `keep_scratch`: keep the pages a next pass of the same width will write (else they return)."""
        if self._pending is None:
            raise RuntimeError("commit() without a pending forward")
        t = self._pending
        added = [t] * self.batch_size if counts is None else counts
        self.lengths = [n + c for n, c in zip(self.lengths, added)]
        self._trim(t if keep_scratch else 0)

    def discard(self) -> None:
        """Drop the pending pass, if one began (its forward failed): nothing of it joins the prefix."""
        self._trim(self._pending or 0)

    def _trim(self, scratch: int) -> None:
        """Return pages past each row's prefix plus `scratch` slots (the next pass of this width)."""
        self._pending, self.view = None, None
        p = self.pool.page_size
        for row, n in enumerate(self.lengths):
            keep = num_pages(n + scratch, p)
            if len(self.pages[row]) > keep:
                self.pool.release(self.pages[row][keep:])
                self.pages[row] = self.pages[row][:keep]

    def extend(self, other: KVCache) -> None:
        """Append `other`'s rows (newly prefilled requests joining a running batch); `other` is left empty."""
        if self._pending is not None or other._pending is not None:
            raise RuntimeError("extend() between a forward and its commit")
        self.pages += other.pages
        self.lengths += other.lengths
        other.pages, other.lengths = [], []

    def select_rows(self, rows: list[int]) -> None:
        """Keep only `rows` (indices into the batch), e.g. when finished requests leave; the other
        rows' pages return to the pool."""
        kept = set(rows)
        for i, pages in enumerate(self.pages):
            if i not in kept:
                self.pool.release(pages)
        self.pages = [self.pages[i] for i in rows]
        self.lengths = [self.lengths[i] for i in rows]

    def split(self, parts: list[list[int]]) -> list[KVCache]:
        """One cache per list of row indices, together holding every row; this one is left empty."""
        caches = []
        for rows in parts:
            cache = KVCache(self.pool)
            cache.pages = [self.pages[i] for i in rows]
            cache.lengths = [self.lengths[i] for i in rows]
            caches.append(cache)
        self.pages, self.lengths = [], []
        return caches

    def release(self) -> None:
        """Return every row's pages (the batch is done or abandoned)."""
        self.select_rows([])
        self._pending, self.view = None, None
