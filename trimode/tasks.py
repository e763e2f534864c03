"""Synthetic chat tasks with exact-match checkers: used by train, eval and bench.

Each task turns a `random.Random` into an `Example` (a user prompt and the one correct answer).
The held-out split is fixed by seed: eval examples come from their own seed stream, and training
streams skip any example whose prompt is in the held-out set, so no eval prompt is ever trained on.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}]

    def is_correct(self, completion: str) -> bool:
        return check(self.task, self.prompt, completion)


@dataclass(frozen=True)
class Difficulty:
    min_items: int = 3  # list length for copy / reverse / sort; pairs for recall
    max_items: int = 8
    max_digits: int = 3  # addition operands have 1..max_digits digits


def _numbers(rng: random.Random, d: Difficulty) -> list[int]:
    return [rng.randrange(100) for _ in range(rng.randint(d.min_items, d.max_items))]


def _copy(rng: random.Random, d: Difficulty) -> tuple[str, str]:
    xs = _numbers(rng, d)
    return "Copy: " + " ".join(map(str, xs)), " ".join(map(str, xs))


def _reverse(rng: random.Random, d: Difficulty) -> tuple[str, str]:
    xs = _numbers(rng, d)
    return "Reverse: " + " ".join(map(str, xs)), " ".join(map(str, reversed(xs)))


def _sort(rng: random.Random, d: Difficulty) -> tuple[str, str]:
    xs = _numbers(rng, d)
    return "Sort: " + " ".join(map(str, xs)), " ".join(map(str, sorted(xs)))


def _add(rng: random.Random, d: Difficulty) -> tuple[str, str]:
    a, b = (rng.randrange(10 ** rng.randint(1, d.max_digits)) for _ in range(2))
    return f"Add: {a} + {b}", str(a + b)


def _recall(rng: random.Random, d: Difficulty) -> tuple[str, str]:
    keys = rng.sample(string.ascii_lowercase, rng.randint(max(d.min_items, 2), max(d.max_items, 2)))
    values = {k: rng.randrange(100) for k in keys}
    query = rng.choice(keys)
    pairs = " ".join(f"{k}={v}" for k, v in values.items())
    return f"Recall: {pairs}. {query}?", str(values[query])


def _solve(task: str, prompt: str) -> str:
    """The reference answer, recomputed from the prompt alone (so the checker trusts nothing else)."""
    body = prompt.split(": ", 1)[1]
    if task in ("copy", "reverse", "sort"):
        xs = [int(t) for t in body.split()]
        xs = {"copy": xs, "reverse": xs[::-1], "sort": sorted(xs)}[task]
        return " ".join(map(str, xs))
    if task == "add":
        a, b = body.split(" + ")
        return str(int(a) + int(b))
    pairs, query = body.rsplit(". ", 1)
    values = dict(p.split("=") for p in pairs.split())
    return values[query.rstrip("?")]


GENERATORS: dict[str, Callable[[random.Random, Difficulty], tuple[str, str]]] = {
    "copy": _copy,
    "reverse": _reverse,
    "sort": _sort,
    "add": _add,
    "recall": _recall,
}
TASKS = tuple(GENERATORS)
HELD_OUT_SEED = 1_000_003


def check(task: str, prompt: str, completion: str) -> bool:
    """Exact match (surrounding whitespace ignored) against the answer recomputed from the prompt."""
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")
    return completion.strip() == _solve(task, prompt)


def make_example(task: str, rng: random.Random, difficulty: Difficulty = Difficulty()) -> Example:
    prompt, answer = GENERATORS[task](rng, difficulty)
    return Example(task, prompt, answer)


def held_out(task: str, n: int = 100, difficulty: Difficulty = Difficulty()) -> list[Example]:
    """The fixed evaluation split of `task` (the same on every machine)."""
    rng = random.Random(f"{HELD_OUT_SEED}:{task}")
    return [make_example(task, rng, difficulty) for _ in range(n)]


def training_stream(
    seed: int, tasks: tuple[str, ...] = TASKS, difficulty: Difficulty = Difficulty(), held_out_size: int = 100
) -> Iterator[Example]:
    """An endless stream of training examples (tasks uniformly mixed), never a held-out prompt."""
    excluded = {e.prompt for t in tasks for e in held_out(t, held_out_size, difficulty)}
    rng = random.Random(f"train:{seed}")
    while True:
        ex = make_example(rng.choice(tasks), rng, difficulty)
        if ex.prompt not in excluded:
            yield ex
