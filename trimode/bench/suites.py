"""Benchmark prompts: the held-out synthetic tasks, held-out stdlib code, long contexts built from
held-out stdlib text, or a user's JSONL file.

JSONL lines: {"id", "category", "prompt" | "messages", optional "answer" (exact match),
optional "max_tokens"}. A malformed line fails with its line number.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from trimode.tasks import TASKS, check, held_out
from trimode.tokenizer import Tokenizer
from trimode.train.data import stdlib_files, stdlib_texts


@dataclass(frozen=True)
class BenchPrompt:
    id: str
    category: str
    prompt: str | None = None  # plain completion prompt, or
    messages: tuple[tuple[str, str], ...] | None = None  # a chat (role, content) pairs
    answer: str | None = None
    max_tokens: int | None = None
    context_length: int | None = None  # the long suite's: the prompt's length in the model's tokens

    def is_correct(self, text: str) -> bool | None:
        """None where there is no answer to check."""
        if self.answer is None:
            return None
        if self.category in TASKS and self.messages:
            return check(self.category, self.messages[-1][1], text)
        if self.category == RECALL:  # the value must come first; what follows it is not judged
            found = re.match(r"\s*(\d+)", text)
            return found is not None and found.group(1) == self.answer
        return text.strip() == self.answer.strip()

    def chat(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages or ()]


def task_suite(num_prompts: int) -> list[BenchPrompt]:
    """Held-out task examples, the tasks interleaved so any prefix of the suite covers all of them."""
    per_task = [held_out(t, -(-num_prompts // len(TASKS))) for t in TASKS]
    interleaved = [ex for group in zip(*per_task) for ex in group][:num_prompts]
    return [
        BenchPrompt(id=f"{e.task}-{i}", category=e.task, messages=(("user", e.prompt),), answer=e.answer)
        for i, e in enumerate(interleaved)
    ]


def code_suite(num_prompts: int, prompt_lines: int = 12) -> list[BenchPrompt]:
    """Continuations of held-out stdlib modules: the first lines of each top-level `def`/`class`."""
    prompts: list[BenchPrompt] = []
    for path in stdlib_files(held_out=True):
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        for i, line in enumerate(lines):
            if line.startswith(("def ", "class ")) and len(prompts) < num_prompts:
                prompts.append(
                    BenchPrompt(
                        id=f"{path.stem}:{i + 1}", category="code", prompt="\n".join(lines[i : i + prompt_lines])
                    )
                )
    if not prompts:
        raise ValueError("the code suite found no held-out stdlib functions")
    return prompts[:num_prompts]


RECALL, CONTINUATION = "kv-recall", "continuation"


def parse_length(text: str) -> int:
    """A context length: tokens, with an optional k (x 1024): "512", "4k", "32K"."""
    t = text.strip().lower()
    try:
        n = int(t[:-1]) * 1024 if t.endswith("k") else int(t)
    except ValueError as e:
        raise ValueError(f"a context length is a number of tokens, optionally with k (4k = 4096); got {text!r}") from e
    if n < 64:
        raise ValueError(f"a context length must be at least 64 tokens; got {text!r}")
    return n


def short_length(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _fit(tokenizer: Tokenizer, make: Callable[[int, int], str], length: int, what: str) -> str:
    """make(shift, n) builds a text around n haystack tokens from `shift` tokens into its window;
    find a text that encodes (BOS included) to exactly `length` tokens. Decoded slices re-encode to
    within a token or two of themselves (merges change only at the seams), so a few corrections of
    n converge, unless a seam merges two tokens whichever n is taken: then the next shift."""
    for shift in range(16):
        n = length
        for _ in range(6):
            text = make(shift, n)
            got = len(tokenizer.encode(text))
            if got == length:
                return text
            n += length - got
    raise ValueError(f"could not build a {what} prompt of exactly {length} tokens with this tokenizer")


def long_suite(
    tokenizer: Tokenizer, context_lengths: list[int], num_prompts: int, depth: float = 0.5, seed: int = 0
) -> list[BenchPrompt]:
    """`num_prompts` prompts per context length, each exactly that many tokens of `tokenizer`
    (BOS included), alternating two kinds from windows of held-out stdlib text:
    - key-value recall (accuracy): `KEY_XXXXXX = 4821` inserted at `depth` (0: the start of the
      haystack, 1: its end), and the prompt ends `assert KEY_XXXXXX ==`: correct when the output
      starts with the value;
    - continuation (speed): the window alone, continued; nothing to check."""
    if not 0 <= depth <= 1:
        raise ValueError(f"--depth must be in [0, 1] (a fraction of the context); got {depth}")
    hay = tokenizer.encode("\n\n".join(stdlib_texts(held_out=True)), add_special_tokens=False)

    def window(start: int, a: int, b: int) -> str:  # haystack tokens [start + a, start + b), cycling
        return tokenizer.decode([hay[(start + j) % len(hay)] for j in range(a, b)])

    def recall(start: int, needle: str, question: str, shift: int, n: int) -> str:
        cut = shift + round(depth * n)
        return f"{window(start, shift, cut)}{needle}{window(start, cut, shift + n)}{question}"

    def continuation(start: int, shift: int, n: int) -> str:
        return window(start, shift, shift + n)

    rng = random.Random(seed)
    prompts = []
    for length in context_lengths:
        for i in range(num_prompts):
            start = rng.randrange(len(hay))
            name = "KEY_" + "".join(rng.choices(string.ascii_uppercase, k=6))
            value = str(rng.randrange(1000, 10000))
            tag = f"{short_length(length)}-{i}"
            if i % 2 == 0:
                make = partial(recall, start, f"\n{name} = {value}\n", f"\n\nassert {name} ==")
                text = _fit(tokenizer, make, length, "recall")
                prompts.append(BenchPrompt(f"{RECALL}-{tag}", RECALL, text, answer=value, context_length=length))
            else:
                text = _fit(tokenizer, partial(continuation, start), length, "continuation")
                prompts.append(BenchPrompt(f"{CONTINUATION}-{tag}", CONTINUATION, text, context_length=length))
    return prompts


def jsonl_suite(path: str | Path, num_prompts: int | None = None) -> list[BenchPrompt]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"suite file {path} does not exist")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: each line must be a JSON object")
        prompt, messages = rec.get("prompt"), rec.get("messages")
        if (prompt is None) == (messages is None):
            raise ValueError(f"{where}: give exactly one of `prompt` (a string) or `messages` (a list)")
        if prompt is not None and (not isinstance(prompt, str) or not prompt):
            raise ValueError(f"{where}: `prompt` must be a non-empty string")
        if messages is not None and not (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise ValueError(f"{where}: `messages` must be a non-empty list of {{role, content}} strings")
        answer, max_tokens = rec.get("answer"), rec.get("max_tokens")
        if answer is not None and not isinstance(answer, str):
            raise ValueError(f"{where}: `answer` must be a string")
        if max_tokens is not None and not (isinstance(max_tokens, int) and max_tokens >= 1):
            raise ValueError(f"{where}: `max_tokens` must be an integer >= 1")
        prompts.append(
            BenchPrompt(
                id=str(rec.get("id", n)),
                category=str(rec.get("category", "default")),
                prompt=prompt,
                messages=tuple((m["role"], m["content"]) for m in messages) if messages else None,
                answer=answer,
                max_tokens=max_tokens,
            )
        )
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts[:num_prompts] if num_prompts else prompts


def load_suite(name: str, num_prompts: int) -> list[BenchPrompt]:
    if name == "tasks":
        return task_suite(num_prompts)
    if name == "code":
        return code_suite(num_prompts)
    if name.endswith(".jsonl"):
        return jsonl_suite(name, num_prompts)
    raise ValueError(f"--suite must be tasks, code, long, or a .jsonl file; got {name!r}")
