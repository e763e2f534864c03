"""Intervals for benchmark rates and ratios: a percentile bootstrap over measurement units.

A unit is one timed batch: (prompt batch, repeat) of one configuration, with its generated tokens
and wall seconds. A configuration's rate is the ratio of sums (tokens / seconds over its units), so
long batches weigh by their length, as a throughput does. Two configurations that ran the same
prompt batches in the same repeats are compared *paired*: each bootstrap draw resamples the same
units for both, which cancels what the prompts and the machine's drift share (Efron & Tibshirani,
An Introduction to the Bootstrap, 1993, ch. 13). Units are given in the order they ran, and drawn in
blocks of consecutive units (the moving-block bootstrap, Kunsch 1989; blocks of ~n^(1/3)): a shared
machine's load lasts longer than one batch, so neighbouring units are not independent, and drawing
them one by one would make the intervals too narrow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NUM_RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    median: float  # of the bootstrap distribution
    lo: float  # 2.5th percentile
    hi: float  # 97.5th percentile

    def contains(self, x: float) -> bool:
        return self.lo <= x <= self.hi

    @property
    def half_width(self) -> float:
        """Half the interval's width relative to its median (0.05 = +-5%)."""
        return (self.hi - self.lo) / 2 / self.median if self.median else float("inf")

    def as_dict(self, digits: int = 3) -> dict[str, float]:
        return {"median": round(self.median, digits), "lo": round(self.lo, digits), "hi": round(self.hi, digits)}


def rate_interval(
    tokens: list[float],
    seconds: list[float],
    base_tokens: list[float] | None = None,
    base_seconds: list[float] | None = None,
    seed: int = 0,
) -> Interval:
    """Bootstrap interval of sum(tokens) / sum(seconds), or, given a base measured on the same units
    (index i of both is the same prompt batch and repeat), of that rate over the base's. Units in
    the order they ran."""
    if not tokens or len(tokens) != len(seconds):
        raise ValueError(f"need one seconds per unit and at least one unit; got {len(tokens)}, {len(seconds)}")
    base = (base_tokens, base_seconds) if base_tokens is not None and base_seconds is not None else None
    if base is not None and not (len(base[0]) == len(base[1]) == len(tokens)):
        raise ValueError("a paired ratio needs the same units on both sides")
    n = len(tokens)
    block = max(1, round(n ** (1 / 3)))
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(n - block + 1, (NUM_RESAMPLES, -(-n // block)), generator=g)
    draw = (starts[..., None] + torch.arange(block)).flatten(1)[:, :n]  # (resamples, n) unit indices

    def rate(t: list[float], s: list[float]) -> torch.Tensor:
        t_, s_ = torch.tensor(t, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
        return t_[draw].sum(1) / s_[draw].sum(1)

    stats = rate(tokens, seconds)
    if base is not None:
        stats = stats / rate(*base)
    q = torch.quantile(stats, torch.tensor([0.5, 0.025, 0.975], dtype=torch.float64)).tolist()
    return Interval(*q)
