"""Per-row token selection: temperature, top-k, top-p, and seeded sampling, vectorised over the batch.

Every row has its own torch.Generator seeded from its request, so a request's samples do not depend
on what else is in the batch. Sampling uses the inverse CDF with one uniform per position (cheap
for 131k-entry vocabularies: no per-token noise).
"""

from __future__ import annotations

import secrets

import torch
import torch.nn.functional as F

from trimode.sampling_params import SamplingParams


def new_generator(params: SamplingParams, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(params.seed if params.seed is not None else secrets.randbits(63))


class Sampler:
    def __init__(
        self, params: list[SamplingParams], device: torch.device, generators: list[torch.Generator] | None = None
    ) -> None:
        self.device = device
        self.params = list(params)
        # 0 marks a greedy row (temperatures below GREEDY_TEMPERATURE included): no NaN ever reaches sampling.
        self.temperature = torch.tensor(
            [0.0 if p.is_greedy else p.temperature for p in params], dtype=torch.float32, device=device
        )
        self.top_k = torch.tensor([p.top_k for p in params], dtype=torch.long, device=device)
        self.top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
        # A request may bring its generator (a preempted request keeps its random stream).
        self.generators = generators or [new_generator(p, device) for p in params]
        self._update_flags()

    def select_rows(self, rows: list[int]) -> None:
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.temperature, self.top_k, self.top_p = (t[index] for t in (self.temperature, self.top_k, self.top_p))
        self.generators = [self.generators[i] for i in rows]
        self.params = [self.params[i] for i in rows]
        self._update_flags()

    def extend(self, other: Sampler) -> None:
        self.temperature = torch.cat([self.temperature, other.temperature])
        self.top_k = torch.cat([self.top_k, other.top_k])
        self.top_p = torch.cat([self.top_p, other.top_p])
        self.generators += other.generators
        self.params += other.params
        self._update_flags()

    def _update_flags(self) -> None:
        self.all_greedy = all(p.is_greedy for p in self.params)
        self.any_greedy = any(p.is_greedy for p in self.params)
        self._needs_filter = any(p.top_k > 0 or p.top_p < 1 for p in self.params if not p.is_greedy)

    def uniform(self, num: int, rows: list[int] | None = None) -> torch.Tensor:
        """(B, num) uniforms in [0, 1), each row from its own generator. With `rows`, only those rows
        draw (the others get 0.5 and their generators do not advance), so a row's random stream depends
        on its own progress alone, never on how long its neighbours keep the batch busy."""
        if rows is None:
            return torch.stack([torch.rand(num, generator=g, device=self.device) for g in self.generators])
        u = torch.full((len(self.generators), num), 0.5, device=self.device)
        for i in rows:
            u[i] = torch.rand(num, generator=self.generators[i], device=self.device)
        return u

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, T, V) logits -> the distribution each row samples from; greedy rows get a one-hot."""
        greedy = self.temperature == 0
        temp = torch.where(greedy, torch.ones_like(self.temperature), self.temperature)[:, None, None]
        scaled = logits.float() / temp
        if self._needs_filter:
            scaled = self._top_k_top_p(scaled)
        p = torch.softmax(scaled, dim=-1)
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
