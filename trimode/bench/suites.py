"""Benchmark prompts: the held-out synthetic tasks, held-out stdlib code, or a user's JSONL file.

JSONL lines: {"id", "category", "prompt" | "messages", optional "answer" (exact match),
optional "max_tokens"}. A malformed line fails with its line number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trimode.tasks import TASKS, check, held_out
from trimode.train.data import stdlib_files


@dataclass(frozen=True)
class BenchPrompt:
    id: str
    category: str
    prompt: str | None = None  # plain completion prompt, or
    messages: tuple[tuple[str, str], ...] | None = None  # a chat (role, content) pairs
    answer: str | None = None
    max_tokens: int | None = None

    def is_correct(self, text: str) -> bool | None:
        """None where there is no answer to check."""
        if self.answer is None:
            return None
        if self.category in TASKS and self.messages:
            return check(self.category, self.messages[-1][1], text)
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
    raise ValueError(f"--suite must be tasks, code, or a .jsonl file; got {name!r}")
