"""Training data: text corpora and chat examples packed into fixed-length rows with loss masks.

Every row is a pure function of (seed, step, row index in the step's global batch), so the data
position needs no state of its own: resuming at step s reproduces exactly the batches an uninterrupted run would see.

Sources (`--data`, comma-separated NAME[:WEIGHT]):
- `stdlib`: the running interpreter's standard library source (PSF-2.0), held-out modules excluded;
- `tasks`: the synthetic chat tasks of `trimode.tasks` (held-out prompts excluded); `tasks.copy+sort`
  picks some of them;
- a path: a text file, a directory of text files, or a JSONL file with `text` or chat `messages`.
Chat data is rendered with the model's chat template; only assistant tokens (and the closing
`<|im_end|>`) are trained on.
"""

from __future__ import annotations

import json
import random
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from trimode.tasks import TASKS, Difficulty, Example, held_out, make_example
from trimode.tokenizer import IM_END, Tokenizer

# Modules never trained on: `trimode eval` reports the AR loss on them.
HELD_OUT_MODULES = ("argparse", "csv", "json", "textwrap", "shlex", "calendar", "fractions", "difflib")
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3", "ensurepip", "turtledemo"}
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".json", ".cfg", ".toml", ".yaml", ".yml", ".c", ".h", ".js"}


def stdlib_files(held_out: bool = False) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS & set(rel.parts[:-1]):
            continue
        module = rel.parts[0].removesuffix(".py")
        if (module in HELD_OUT_MODULES) == held_out:
            files.append(path)
    return files


def stdlib_texts(held_out: bool = False) -> list[str]:
    """The source text of `stdlib_files(held_out)`."""
    return [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files(held_out)]


@dataclass
class Row:
    tokens: list[int]
    eligible: list[bool]


class TextSource:
    """Documents joined into one token stream (each ends in EOS); rows are random windows of it."""

    def __init__(self, documents: list[str], tokenizer: Tokenizer, eos_id: int) -> None:
        ids: list[int] = []
        for doc in documents:
            ids += tokenizer.encode(doc, add_special_tokens=True) + [eos_id]
        if not ids:
            raise ValueError("a text source has no documents")
        self.ids = torch.tensor(ids)

    def row(self, rng: random.Random, length: int) -> Row:
        start = rng.randrange(max(len(self.ids) - length, 1))
        window = self.ids[start : start + length].tolist()
        return Row(window, [True] * len(window))


class ChatSource:
    """Chat examples (prompt rendered by the chat template, then the trained answer), packed per row."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        conversations: list[list[dict[str, str]]] | None = None,
        tasks: tuple[str, ...] = (),
        difficulty: Difficulty = Difficulty(),
    ) -> None:
        self.tokenizer = tokenizer
        self.tasks, self.difficulty = tasks, difficulty
        self.excluded = {e.prompt for t in tasks for e in held_out(t, difficulty=difficulty)}
        self.turns = [
            (c[:i], m["content"]) for c in conversations or [] for i, m in enumerate(c) if m.get("role") == "assistant"
        ]
        if not self.turns and not tasks:
            raise ValueError("a chat source has no assistant turns")

    def encode(self, messages: list[dict[str, str]], answer: str) -> Row:
        prompt = self.tokenizer.encode_chat(messages)
        reply = self.tokenizer.encode(answer + IM_END, add_special_tokens=False)
        return Row(prompt + reply, [False] * len(prompt) + [True] * len(reply))

    def _example(self, rng: random.Random) -> Row:
        if self.tasks:
            while True:
                ex: Example = make_example(rng.choice(self.tasks), rng, self.difficulty)
                if ex.prompt not in self.excluded:
                    return self.encode(ex.messages(), ex.answer)
        messages, answer = rng.choice(self.turns)
        return self.encode(messages, answer)

    def row(self, rng: random.Random, length: int) -> Row:
        tokens: list[int] = []
        eligible: list[bool] = []
        while len(tokens) < length:
            ex = self._example(rng)
            tokens += ex.tokens
            eligible += ex.eligible
        return Row(tokens[:length], eligible[:length])


def _path_source(path: Path, tokenizer: Tokenizer, eos_id: int) -> TextSource | ChatSource:
    if not path.exists():
        raise FileNotFoundError(f"data source {path} does not exist")
    if path.suffix == ".jsonl":
        texts, chats = [], []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                texts.append(record["text"])
            elif isinstance(record, dict) and isinstance(record.get("messages"), list):
                chats.append(record["messages"])
            else:
                raise ValueError(f"{path}:{n}: a line needs a string `text` or a list `messages`")
        if chats and texts:
            raise ValueError(f"{path}: mixes `text` and `messages` lines; split it into two files")
        return ChatSource(tokenizer, conversations=chats) if chats else TextSource(texts, tokenizer, eos_id)
    files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES) if path.is_dir() else [path]
    return TextSource([f.read_text(encoding="utf-8", errors="replace") for f in files], tokenizer, eos_id)


def parse_data_spec(spec: str) -> list[tuple[str, float]]:
    """'stdlib:2,tasks,data/x.jsonl:0.5' -> [('stdlib', 2.0), ('tasks', 1.0), ('data/x.jsonl', 0.5)]."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, weight = item.rpartition(":") if ":" in item else (item, "", "1")
        try:
            w = float(weight)
        except ValueError as e:
            raise ValueError(f"--data item {item!r}: weight {weight!r} is not a number") from e
        if w <= 0:
            raise ValueError(f"--data item {item!r}: weight must be > 0")
        out.append((name, w))
    if not out:
        raise ValueError("--data names no source; e.g. --data stdlib,tasks")
    return out


def _task_names(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """'tasks' -> all tasks; 'tasks.copy+sort' -> those two."""
    if name == "tasks":
        return default
    chosen = tuple(name.removeprefix("tasks.").split("+"))
    unknown = [t for t in chosen if t not in TASKS]
    if unknown:
        raise ValueError(f"--data {name!r}: unknown tasks {unknown}; tasks are {', '.join(TASKS)}")
    return chosen


class Batcher:
    def __init__(
        self,
        spec: str,
        tokenizer: Tokenizer,
        eos_id: int,
        pad_id: int,
        seq_len: int,
        seed: int,
        tasks: tuple[str, ...] = TASKS,
        difficulty: Difficulty = Difficulty(),
    ) -> None:
        self.seq_len, self.seed, self.pad_id = seq_len, seed, pad_id
        self.sources: list[TextSource | ChatSource] = []
        self.weights: list[float] = []
        for name, weight in parse_data_spec(spec):
            if name == "stdlib":
                source: TextSource | ChatSource = TextSource(stdlib_texts(), tokenizer, eos_id)
            elif name == "tasks" or name.startswith("tasks."):
                source = ChatSource(tokenizer, tasks=_task_names(name, tasks), difficulty=difficulty)
            else:
                source = _path_source(Path(name), tokenizer, eos_id)
            self.sources.append(source)
            self.weights.append(weight)

    def get(self, step: int, rows: range) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0 (N, L) long, eligible (N, L) bool) for rows `rows` of step `step`'s global batch.

        Each row is a function of (seed, step, row) alone, so the global batch is the same however
        it is split over ranks and micro-batches, and a resumed run reads what it would have."""
        x0 = torch.full((len(rows), self.seq_len), self.pad_id, dtype=torch.long)
        eligible = torch.zeros(len(rows), self.seq_len, dtype=torch.bool)
        for i, index in enumerate(rows):
            rng = random.Random(f"{self.seed}:{step}:{index}")
            row = rng.choices(self.sources, self.weights)[0].row(rng, self.seq_len)
            x0[i, : len(row.tokens)] = torch.tensor(row.tokens)
            eligible[i, : len(row.eligible)] = torch.tensor(row.eligible)
        return x0, eligible


def corpus_texts(spec: str, task_examples: int = 20000, seed: int = 0) -> Iterator[str]:
    """The raw text of a data spec, for training a tokenizer (chat tasks as their rendered turns)."""
    for name, _ in parse_data_spec(spec):
        if name == "stdlib":
            yield from stdlib_texts()
        elif name == "tasks":
            rng = random.Random(seed)
            for _ in range(task_examples):
                ex = make_example(rng.choice(TASKS), rng)
                yield f"{ex.prompt}\n{ex.answer}\n"
        else:
            path = Path(name)
            if not path.exists():
                raise FileNotFoundError(f"data source {path} does not exist")
            files = (
                sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES | {".jsonl"})
                if path.is_dir()
                else [path]
            )
            yield from (f.read_text(encoding="utf-8", errors="replace") for f in files)
