"""Forward counts and times by kind ("ar", "denoise", "verify", ...), without syncing the device.

On CPU a forward is timed by the wall clock around it. On CUDA the runner records an event pair
around it instead and the pair is read only when the times are: by then the step's one host sync
(reading what it emitted) has waited for the queue, so reading them waits for nothing.
"""

from __future__ import annotations

from collections import defaultdict

import torch


class ForwardTimes:
    def __init__(self) -> None:
        self._count: defaultdict[str, int] = defaultdict(int)
        self._seconds: defaultdict[str, float] = defaultdict(float)
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    def add(self, kind: str, seconds: float) -> None:
        self._count[kind] += 1
        self._seconds[kind] += seconds

    def add_events(self, kind: str, start: torch.cuda.Event, end: torch.cuda.Event) -> None:
        self._count[kind] += 1
        self._events.append((kind, start, end))

    def _resolve(self) -> None:
        for kind, start, end in self._events:
            end.synchronize()  # complete already after the step's sync: returns at once
            self._seconds[kind] += start.elapsed_time(end) / 1000
        self._events = []

    def merge(self, other: ForwardTimes) -> None:
        other._resolve()
        for kind, n in other._count.items():
            self._count[kind] += n
            self._seconds[kind] += other._seconds[kind]

    def copy(self) -> ForwardTimes:
        times = ForwardTimes()
        times.merge(self)
        return times

    def mean_ms(self) -> dict[str, float]:
        """kind -> mean milliseconds per forward."""
        self._resolve()
        return {k: round(1000 * self._seconds[k] / n, 3) for k, n in self._count.items()}
