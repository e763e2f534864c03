"""The Decoder interface every mode implements, and the batch state decoders work on.

Decoders never call the model. Each engine step asks a group's decoder to `plan` one forward over
all its rows (tokens, and per row: causal or bidirectional, draft LoRA on or off), the model runner
runs it (possibly in one model forward with other groups' passes), and the decoder's `accept` turns
the logits into KV commits, new per-row state and an `Emission`: what the step's one host transfer
carries for it, and how to read that into emitted tokens. So a step is at most one pass per group,
and rows advance independently: one row of a diffusion batch may be denoising while another commits
its finished block, one self-spec row drafting while another verifies. Per-row state is typed
(`trimode.rows`): the batch's own fields, and each feature's and decoder's dataclass, follow the
rows when requests join or leave.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch

from trimode import logit_controls, structured
from trimode.forward import Forward
from trimode.kv_cache import KVCache
from trimode.logit_controls import LogitControls
from trimode.rows import SHARED, Rows
from trimode.sampler import Sampler
from trimode.sampling_params import MAX_LOGPROBS, SamplingParams
from trimode.timing import ForwardTimes


@dataclass
class Emission:
    """What an accept leaves for the host: `values` (B, W) integers on the device, and `read`, which
    turns their host copy (one list of W per row) into the tokens each row emitted, finishing the
    accept's host-side work (statistics, host phases).

    With log-probabilities asked for, `logprobs` (B, L, E) holds `logprob_table` entries whose
    first n per row belong to the n tokens the row emitted, in order; `prompt_logprobs` (B, T, E)
    those of a prefill's fed positions (position j predicts context token j + 1).

    `keep` says how the pass's K/V join each row's prefix; decoders never commit it themselves. The
    engine step (`engine/step.py`, the one owner of a pass's KV transaction) begins the pass,
    runs `read`, then commits `keep(emitted)`: per row, how many of the pass's first tokens join
    (None: all of them; a count known only after the host read, such as a verify's accepted
    drafts, comes from what the row emitted). `keep_scratch`: whether the row keeps the pages its
    next pass of this width will write (decode passes repeat their width; a prefill does not)."""

    values: torch.Tensor
    read: Callable[[list[list[int]]], list[list[int]]]
    logprobs: torch.Tensor | None = None
    prompt_logprobs: torch.Tensor | None = None
    keep: Callable[[list[list[int]]], list[int] | None] = lambda emitted: None
    keep_scratch: bool = True

    @classmethod
    def seeds(cls, seeds: torch.Tensor, logprobs: torch.Tensor | None = None) -> Emission:
        """Each row emitted one token, its new seed (B,) (and its logprob entry (B, 1, E))."""
        return cls(seeds[:, None], lambda rows: rows, logprobs)


def keep_emitted(emitted: list[list[int]]) -> list[int]:
    """`Emission.keep` of a chain of verified tokens: each emitted token's predecessor joins the
    prefix, so a row keeps as many of the pass's tokens as it emitted."""
    return [len(e) for e in emitted]


def keep_counts(counts: list[int]) -> Callable[[list[list[int]]], list[int]]:
    """`Emission.keep` of counts known when the pass is accepted."""
    return lambda emitted: counts


@dataclass
class HostEmission:
    """One emission's host copy: `values` per row, and its logprob entries per row (lists of E floats)."""

    values: list[list[int]]
    logprobs: list[list[list[float]]] | None
    prompt_logprobs: list[list[list[float]]] | None


def transfer(emissions: list[Emission]) -> list[HostEmission]:
    """Every part of an engine step copied to the host in one transfer (one sync on a GPU; none when
    no part has values): the integers and the logprob floats as the bytes of one buffer."""
    ints = [e.values.reshape(-1).long() for e in emissions]
    floats = [x.reshape(-1).float() for e in emissions for x in (e.logprobs, e.prompt_logprobs) if x is not None]
    num_ints = sum(x.numel() for x in ints)
    flat: list[int] = []
    rest: list[float] = []
    if floats:  # the integers' and the floats' bytes as one buffer, read once
        raw = bytes(torch.cat([torch.cat(ints).view(torch.uint8), *(x.view(torch.uint8) for x in floats)]).tolist())
        flat, rest = array("q", raw[: 8 * num_ints]).tolist(), array("f", raw[8 * num_ints :]).tolist()
    elif num_ints:
        flat = torch.cat(ints).tolist()
    out, at, fat = [], 0, 0
    for e in emissions:
        b, w = e.values.shape
        tables = []
        for x in (e.logprobs, e.prompt_logprobs):
            tables.append(None if x is None else _nest(rest[fat : fat + x.numel()], x.shape))
            fat += 0 if x is None else x.numel()
        out.append(HostEmission([flat[at + i * w : at + (i + 1) * w] for i in range(b)], *tables))
        at += b * w
    return out


def _nest(flat: list[float], shape: torch.Size) -> list[list[list[float]]]:
    """A flat (B * L * E) list as B rows of L entries of E values."""
    b, length, e = shape
    return [[flat[(i * length + j) * e : (i * length + j + 1) * e] for j in range(length)] for i in range(b)]


def logprob_table(logprobs: torch.Tensor, tokens: torch.Tensor, k: int) -> torch.Tensor:
    """Log-probabilities (B, T, V) and the tokens chosen at each position (B, T) -> (B, T, 2 + 2k)
    float32 entries: [the token's log-probability, its rank (1 = most likely), the k most likely
    token ids (exact in float32 below 2**24), their log-probabilities]."""
    chosen = logprobs.gather(-1, tokens[..., None])  # (B, T, 1)
    rank = (logprobs > chosen).sum(-1, keepdim=True) + 1
    top = logprobs.topk(k, -1)
    return torch.cat([chosen, rank.float(), top.indices.float(), top.values], -1).float()


def mixed(flags: list[bool], kinds: tuple[str, str], device: torch.device) -> tuple[str, torch.Tensor | bool]:
    """Per-row flags (host) -> the forward's kind (kinds[1] where True) and the flag in its simplest
    form: one bool when every row agrees (the model then skips per-row work), else a (B,) tensor."""
    if all(flags):
        return kinds[1], True
    if not any(flags):
        return kinds[0], False
    return "+".join(kinds), torch.tensor(flags, device=device)


def rows_where(flags: list[bool]) -> list[int]:
    """The indices of the rows whose flag is set (e.g. the rows that draw random numbers)."""
    return [i for i, f in enumerate(flags) if f]


S = TypeVar("S", bound=Rows)


@dataclass
class DecodeBatch(Rows):
    """A decode batch's rows. Every field not marked `SHARED` is per row and follows the rows
    through `extend`, `split` and `select_rows` (`trimode.rows`), features included: the logit
    controls (None while no row has any) and the decoder's own state (`decoding`, set by
    `Decoder.start`)."""

    kv: KVCache = field(metadata=SHARED)
    sampler: Sampler  # its rows' sampling parameters and random streams
    seeds: torch.Tensor  # (B,) the last emitted token of each row, not yet fed to the model
    remaining: torch.Tensor  # (B,) tokens each row may still emit (from the engine's host counts)
    eos_ids: torch.Tensor = field(metadata=SHARED)  # (E,) ids that end a row
    stop_on_eos: torch.Tensor  # (B,) bool, False for rows with ignore_eos
    mask_id: int = field(metadata=SHARED)
    num_forwards: list[int]  # per row: forwards it took part in, prefill included
    stats: list[list[int]]  # per row: the mode's per-step statistic (the request's own list)
    logprobs: list[int | None]  # per row: its request's `SamplingParams.logprobs`
    grammar: list[Any]  # per row: its structured output's llguidance matcher, or None
    controls: LogitControls | None = None
    decoding: Rows | None = None
    # (B, n, V) logits of the masks a prefill fed after each row's context (`Decoder.prefill_tail`)
    # at positions 1..n of that block, until the decoder's `start` drafts from them.
    prefill_drafts: torch.Tensor | None = None
    timings: ForwardTimes = field(default_factory=ForwardTimes, metadata=SHARED)

    def state(self, kind: type[S]) -> S:
        """The decoder's per-row state, of the type its `start` gave it."""
        assert isinstance(self.decoding, kind), f"the batch's decoder state is {type(self.decoding).__name__}"
        return self.decoding

    def controlled(
        self,
        logits: torch.Tensor,
        offsets: torch.Tensor | None = None,
        within: torch.Tensor | None = None,
        paths: list[list[list[int] | None]] | None = None,
    ) -> torch.Tensor:
        """The logits picks read: reshaped by the rows' logit controls (`logit_controls.apply`) and
        masked by their structured-output grammars (`structured.masks`; `paths` default: every
        position after the tokens so far), or `logits` itself when no row has either."""
        logits = logit_controls.apply(self.controls, logits, offsets, within)
        if self.constrained:
            paths = paths or [[[]] * logits.shape[1]] * logits.shape[0]
            allowed = structured.masks(self.grammar, paths, logits.shape[-1], logits.device)
            logits = logits.masked_fill(~allowed, float("-inf"))
        return logits

    @property
    def constrained(self) -> bool:
        """Whether a row has a structured-output grammar."""
        return any(m is not None for m in self.grammar)

    def logprobs_of(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor | None:
        """`logprob_table` of the model's own (untempered) distributions at `logits` (B, T, V) for
        the chosen `tokens` (B, T), when a row asked for logprobs; else None."""
        if all(k is None for k in self.logprobs):
            return None
        return logprob_table(logits.float().log_softmax(-1), tokens, MAX_LOGPROBS)

    def bidirectional_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """A masked position predicts its own token, which is never the mask token itself."""
        logits[..., self.mask_id] = float("-inf")
        return logits

    def record(self, values: list[int], rows: list[bool] | None = None) -> None:
        """Append each row's statistic (only `rows`' when given)."""
        for row, v, k in zip(self.stats, values, rows or [True] * self.size):
            if k:
                row.append(int(v))

    def extend(self, other: DecodeBatch) -> None:
        """Append `other`'s rows: requests prefilled later join this running batch (continuous
        batching). Decoders treat rows independently, so a row decodes the same either way."""
        joined = self.join(other)
        self.kv.extend(other.kv)
        self.timings.merge(other.timings)
        self._take_rows(joined)

    def split(self, parts: list[list[int]]) -> list[DecodeBatch]:
        """One new batch per list of row indices (together: every row): rows prefilled together,
        decoded apart. The parts take over their rows' pages; each gets a copy of the timings so far."""
        if len(parts) == 1 and parts[0] == list(range(self.size)):
            return [self]
        batches = []
        for rows, kv in zip(parts, self.kv.split(parts)):
            part = self.select(rows)
            part.kv, part.timings = kv, self.timings.copy()
            batches.append(part)
        return batches

    def select_rows(self, rows: list[int]) -> None:
        """Keep only `rows` (indices), e.g. after requests finish; the others' KV pages return."""
        self.kv.select_rows(rows)
        self._take_rows(self.select(rows))

    def release(self) -> None:
        """The batch is done or abandoned: every row's KV pages return to the pool."""
        self.kv.release()

    def _take_rows(self, other: DecodeBatch) -> None:
        """This batch's per-row fields become `other`'s (in place: groups hold this object)."""
        for name, value in other._row_items():
            setattr(self, name, value)


class Decoder(ABC):
    mode: ClassVar[str]
    stat_name: ClassVar[str | None] = None  # what `DecodeBatch.stats` holds for this mode
    width: int = 1  # tokens each row feeds per forward (what a step may add to its KV pages)
    # Masks a row's prefill feeds after its context, bidirectional among themselves with the draft
    # LoRA on, so its first block is drafted in the prefill's forward (`DecodeBatch.prefill_drafts`).
    prefill_tail: int = 0

    @classmethod  # noqa: B027 (optional: modes that set no rule)
    def check(cls, params: SamplingParams) -> None:
        """The rules this mode sets on a request's other fields (each field's own range is
        SamplingParams'); a ValueError names the field and what it must be."""

    def start(self, batch: DecodeBatch) -> None:  # noqa: B027 (optional: modes without per-row state)
        """Set up the per-row state of freshly prefilled rows (every row of `batch`), before they
        join a running batch of this mode."""

    def at_boundary(self, batch: DecodeBatch) -> list[bool]:
        """Per row: whether it is between cycles, so it may move to another exact decoding
        (mode auto) with nothing lost but drafts: its KV prefix is AR's, its seed not yet fed."""
        return [True] * batch.size

    def pending_commit(self, batch: DecodeBatch) -> list[bool]:
        """Per row: whether its output ends in tokens not yet in its KV prefix besides the seed
        (which the next forward would commit, and whose next token it would give). A preempted row
        resumes by prefilling its prompt and output: all of it where this is True, else all but
        the seed, which it then feeds as usual."""
        return [False] * batch.size

    @abstractmethod
    def plan(self, batch: DecodeBatch) -> Forward:
        """The next forward over every row."""

    @abstractmethod
    def accept(self, batch: DecodeBatch, logits: torch.Tensor) -> Emission:
        """Take the planned forward's logits: commit KV, update state, and leave what the step's
        transfer reads into the tokens each row emitted (the engine truncates at EOS, stop strings
        and budgets). Nothing reads the device here."""
