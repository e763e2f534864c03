"""Per-row token selection: temperature, top-k, top-p, min-p, and seeded sampling, vectorised over the batch.

Every row has its own random stream keyed by its request's seed, so a request's samples do not
depend on what else is in the batch. The streams are counter-based (as Philox is: Salmon et al.,
"Parallel random numbers: as easy as 1, 2, 3", SC 2011): uniform j of a row's n-th draw is a hash
of (seed, n, j), so one vectorised call serves every row, with no Python loop over per-row
generators, and a stream's whole state is its draw count. Sampling uses the inverse CDF with one
uniform per position (cheap for 131k-entry vocabularies: no per-token noise).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trimode.rows import Rows
from trimode.sampling_params import SamplingParams

_M32 = 0xFFFFFFFF


@dataclass
class RandomStream:
    """A request's random numbers: its seed and how many draws it has made (kept across preemption).
    `emitted_at`: the draws it had made when it last emitted tokens. A preempted request resumes
    from there: draws for work it loses (a diffusion block half denoised, self-spec drafts not yet
    verified) are drawn again, so it samples exactly what it would have uninterrupted."""

    seed: int
    draws: int = 0
    emitted_at: int = 0

    def rewind(self) -> None:
        """Back to the draws of its last emission (`emitted_at`)."""
        self.draws = self.emitted_at


def new_stream(params: SamplingParams) -> RandomStream:
    return RandomStream((params.seed if params.seed is not None else secrets.randbits(63)) & (2**64 - 1))


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x < 2^32, in 16-bit halves so that no int64 product overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser: a bijection of [0, 2^32) whose output bits all depend on every input bit."""
    h = _mul32(h ^ (h >> 16), 0x85EBCA6B)
    h = _mul32(h ^ (h >> 13), 0xC2B2AE35)
    return h ^ (h >> 16)


def counter_uniform(seeds: torch.Tensor, draws: torch.Tensor, num: int) -> torch.Tensor:
    """(B,) 64-bit seeds (as int64) and draw counts -> (B, num) float32 uniforms in [0, 1), uniform
    j of row b a hash of (seeds[b], draws[b], j) with 24 random bits (float32's resolution)."""
    j = torch.arange(num, device=seeds.device)[None]
    h = _mix((j + 0x9E3779B9) & _M32)
    h = _mix(h ^ (draws[:, None] & _M32))
    h = _mix(h ^ ((seeds[:, None] >> 32) & _M32))
    h = _mix(h ^ (seeds[:, None] & _M32))
    return (h >> 8).float() * 2.0**-24


@dataclass
class Sampler(Rows):
    """The rows' sampling parameters, as tensors (`trimode.rows`: they follow the rows of their batch)."""

    params: list[SamplingParams]
    # Each row's random stream (a preempted request brings its own and keeps its random numbers).
    streams: list[RandomStream]
    temperature: torch.Tensor  # (B,) float; 0 marks a greedy row (see `of`)
    top_k: torch.Tensor  # (B,) long
    top_p: torch.Tensor  # (B,) float
    min_p: torch.Tensor  # (B,) float
    seeds: torch.Tensor  # (B,) the seeds as int64 bit patterns, on the device once (draw counts change every call)

    @classmethod
    def of(
        cls, params: list[SamplingParams], device: torch.device, streams: list[RandomStream] | None = None
    ) -> Sampler:
        streams = streams or [new_stream(p) for p in params]

        def floats(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        return cls(
            list(params),
            streams,
            # 0 marks a greedy row (temperatures below GREEDY_TEMPERATURE included): no NaN ever reaches sampling.
            floats([0.0 if p.is_greedy else p.temperature for p in params]),
            torch.tensor([p.top_k for p in params], dtype=torch.long, device=device),
            floats([p.top_p for p in params]),
            floats([p.min_p for p in params]),
            torch.tensor([s.seed - (1 << 64) if s.seed >= 1 << 63 else s.seed for s in streams], device=device),
        )

    def __post_init__(self) -> None:
        # What every pick asks, from the host (`select` and `join` build new samplers, so these follow).
        self.all_greedy = all(p.is_greedy for p in self.params)
        self.any_greedy = any(p.is_greedy for p in self.params)
        self._needs_filter = any(p.top_k > 0 or p.top_p < 1 for p in self.params if not p.is_greedy)
        self._needs_min_p = any(p.min_p > 0 for p in self.params if not p.is_greedy)

    @property
    def device(self) -> torch.device:
        return self.seeds.device

    def uniform(self, num: int, rows: list[int] | None = None) -> torch.Tensor:
        """(B, num) uniforms in [0, 1), each row from its own stream. With `rows`, only those rows
        draw (the others get 0.5 and their streams do not advance), so a row's random numbers depend
        on its own progress alone, never on how long its neighbours keep the batch busy."""
        drawing = range(len(self.streams)) if rows is None else rows
        draws = torch.tensor([s.draws for s in self.streams], device=self.device)  # host ints: no sync
        for i in drawing:
            self.streams[i].draws += 1
        u = counter_uniform(self.seeds, draws, num)
        if rows is None:
            return u
        mask = torch.zeros(len(self.streams), 1, dtype=torch.bool)
        mask[list(rows)] = True
        return torch.where(mask.to(self.device), u, 0.5)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, T, V) logits -> the distribution each row samples from; greedy rows get a one-hot."""
        greedy = self.temperature == 0
        temp = torch.where(greedy, torch.ones_like(self.temperature), self.temperature)[:, None, None]
        scaled = logits.float() / temp
        if self._needs_filter:
            scaled = self._top_k_top_p(scaled)
        p = torch.softmax(scaled, dim=-1)
        if self._needs_min_p:
            # min-p sampling (Nguyen et al. 2024): drop tokens below min_p x the most likely one's
            # probability, then renormalise (the verifier's p must stay a distribution).
            floor = self.min_p[:, None, None] * p.amax(-1, keepdim=True)
            p = torch.where(p < floor, 0.0, p)
            p = p / p.sum(-1, keepdim=True)
        if self.any_greedy:
            one_hot = F.one_hot(logits.argmax(-1), logits.shape[-1]).to(p.dtype)
            p = torch.where(greedy[:, None, None], one_hot, p)
        return p

    def _top_k_top_p(self, scaled: torch.Tensor) -> torch.Tensor:
        vocab = scaled.shape[-1]
        values, order = scaled.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=scaled.device)
        k = torch.where(self.top_k > 0, self.top_k, vocab)[:, None, None]
        keep = ranks < k
        p = torch.softmax(values.masked_fill(~keep, float("-inf")), dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the most likely token always stays). Rows
        # with top_p = 1 keep everything: rounding can push the cumulative sum past 1.0 in the tail.
        top_p = self.top_p[:, None, None]
        keep = keep & (((p.cumsum(-1) - p) < top_p) | (top_p >= 1))
        return torch.empty_like(scaled).scatter_(-1, order, values.masked_fill(~keep, float("-inf")))

    def sample(self, probs: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
        """(B, T, V) non-negative weights (need not sum to 1) -> (B, T) token ids. With `rows`, only
        those rows draw random numbers (see `uniform`); the others' picks are meaningless."""
        cdf = probs.cumsum(-1)
        u = self.uniform(probs.shape[1], rows) * cdf[..., -1]
        # right=True picks the first index whose cdf exceeds u, which always has positive weight.
        return torch.searchsorted(cdf, u[..., None], right=True)[..., 0].clamp(max=probs.shape[-1] - 1)

    def pick(self, logits: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
        """(B, T, V) -> tokens (B, T): argmax for greedy rows, a sample for the others. `rows`: only
        these rows' picks are used (see `sample`)."""
        return logits.argmax(-1) if self.all_greedy else self.sample(self.probs(logits), rows)
