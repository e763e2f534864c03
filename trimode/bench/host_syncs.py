"""Count the host syncs a piece of code makes: every read of a tensor's values into Python
(`tolist`, `item`, `bool`/`int`/`float` of a tensor, `.cpu()`, `.numpy()`) and every op whose
output shape depends on values (`nonzero`, boolean-mask indexing, ...). On a GPU each is a
device-to-host transfer that waits for the queue to drain; on a CPU they cost nothing, so this
counts them where they cannot be timed. Host copies made before a forward (`torch.tensor(list)`)
are transfers the other way and are not counted."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"}
DATA_DEPENDENT = {"nonzero", "masked_select", "unique", "argwhere", "repeat_interleave"}


class HostSyncCounter(TorchFunctionMode):
    """`with HostSyncCounter() as c: ...`; then `c.total` and `c.by_name`."""

    def __init__(self) -> None:
        super().__init__()
        self.by_name: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_name.values())

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in READS or name in DATA_DEPENDENT:
            self.by_name[name] += 1
        elif name == "__getitem__" and _has_bool_index(args[1] if len(args) > 1 else None):
            self.by_name["bool-index"] += 1
        return func(*args, **(kwargs or {}))


def _has_bool_index(index: object) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)
