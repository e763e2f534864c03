"""Per-row state, typed, with one generic way to follow rows as requests join, leave and split.

Every feature that keeps state per row of a decode batch (the batch itself, the logit controls,
each decoder) declares it once as a `Rows` dataclass whose fields are row-aligned:
- a tensor whose dim 0 is the rows;
- a list with one entry per row (host state: what a step plans from without reading the device);
- an optional tensor, None until a row first needs it (e.g. self-spec's draft distribution, which
  only sampled rows write): rows that lack it read zeros, shaped as the first holder shapes it;
- a nested `Rows`, or None for a feature no row of the batch uses yet: rows that lack the feature
  get its `blank` state, which every feature defines as "off" (by default zero tensors, lists of
  None, nested features absent).
`select` and `join` walk the fields, so a feature cannot forget a path, and a row's state is the
same whatever rows it is batched with. Fields marked `SHARED` are per batch, not per row.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Self, TypeVar

import torch

# A field's metadata that makes it per batch, not per row (`select` and `join` keep it):
# `field(metadata=SHARED)`.
SHARED = {"shared": True}


@dataclasses.dataclass
class Rows:
    @property
    def size(self) -> int:
        for _, value in self._row_items():
            if isinstance(value, torch.Tensor | list):
                return len(value)
            if isinstance(value, Rows):
                return value.size
        raise TypeError(f"{type(self).__name__} has no row-aligned field to count its rows by")

    @classmethod
    def blank(cls, n: int, like: Self) -> Self:
        """`n` rows without the feature, shaped like `like`'s rows. Default: zero tensors, lists of
        None, nested features absent; a feature whose "off" is not zeros overrides this."""
        return dataclasses.replace(like, **{f: _blank(v, n) for f, v in like._row_items()})

    def select(self, rows: list[int]) -> Self:
        """Only `rows` (indices, in this order)."""
        index = torch.tensor(rows, dtype=torch.long)
        return dataclasses.replace(self, **{f: _take(v, rows, index) for f, v in self._row_items()})

    def join(self, other: Self) -> Self:
        """This batch's rows, then `other`'s."""
        n, m = self.size, other.size
        return dataclasses.replace(self, **{f: _cat(v, n, getattr(other, f), m) for f, v in self._row_items()})

    def _row_items(self) -> list[tuple[str, Any]]:
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if not f.metadata.get("shared")]


R = TypeVar("R", bound="Rows")


def join_optional(a: R | None, n: int, b: R | None, m: int) -> R | None:
    """Join a feature's rows where either side (of `n` and `m` rows) may lack the feature."""
    if a is None and b is None:
        return None
    if a is None:
        assert b is not None
        a = type(b).blank(n, b)
    if b is None:
        b = type(a).blank(m, a)
    return a.join(b)


def _blank(value: Any, n: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value.new_zeros((n, *value.shape[1:]))
    if isinstance(value, list):
        return [None] * n
    return None  # an optional tensor or a nested feature: absent


def _take(value: Any, rows: list[int], index: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return value[index.to(value.device)]
    if isinstance(value, list):
        return [value[i] for i in rows]
    if isinstance(value, Rows):
        return value.select(rows)
    return value  # None: no row holds it


def _cat(a: Any, n: int, b: Any, m: int) -> Any:
    if isinstance(a, Rows) or isinstance(b, Rows):
        return join_optional(a, n, b, m)
    if isinstance(a, list):
        return a + b
    if a is None and b is None:
        return None
    # Optional tensors: a side that has none yet reads zeros, shaped from its own row count.
    if a is None:
        a = b.new_zeros((n, *b.shape[1:]))
    if b is None:
        b = a.new_zeros((m, *a.shape[1:]))
    return torch.cat([a, b])
