"""Model quality: exact-match task accuracy per mode, tokens per forward, held-out stdlib loss."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from trimode.decoding import MODE_PARAMETERS, uses
from trimode.llm import LLM
from trimode.model.transformer import ForwardContext
from trimode.sampling_params import SamplingParams
from trimode.tasks import TASKS, held_out
from trimode.tokenizer import Tokenizer

# SamplingParams fields that belong to some modes only (block_length, spec, threshold).
MODE_FIELDS = {name for names in MODE_PARAMETERS.values() for name in names}


def task_accuracy(
    llm: LLM,
    modes: list[str],
    n: int = 100,
    tasks: tuple[str, ...] = TASKS,
    max_tokens: int = 48,
    use_tqdm: bool = True,
    **params: Any,
) -> dict[str, dict[str, float]]:
    """{mode: {task: accuracy, ..., "tokens_per_forward": x}} on the first n held-out examples per task;
    `use_tqdm`: a progress bar per mode.

    Every mode after the first also gets "same_tokens_as_<first mode>": the fraction of examples
    whose generated tokens equal the first mode's (selfspec must give 1.0 against ar)."""
    examples = [e for t in tasks for e in held_out(t, n)]
    report: dict[str, dict[str, float]] = {}
    first: list | None = None
    for mode in modes:
        # A mode's own fields (block_length, spec, threshold) go to the modes that read them.
        own = {k: v for k, v in params.items() if k not in MODE_FIELDS or uses(mode, k)}
        outs = llm.chat(
            [e.messages() for e in examples],
            SamplingParams(mode=mode, max_tokens=max_tokens, temperature=0.0, **own),
            use_tqdm=use_tqdm,
        )
        row: dict[str, float] = {}
        for task in tasks:
            pairs = [(e, o) for e, o in zip(examples, outs) if e.task == task]
            row[task] = sum(e.is_correct(o.text) for e, o in pairs) / len(pairs)
        row["tokens_per_forward"] = sum(o.num_generated_tokens for o in outs) / sum(o.num_forwards for o in outs)
        if first is None:
            first = outs
        else:
            row[f"same_tokens_as_{modes[0]}"] = sum(a.token_ids == b.token_ids for a, b in zip(first, outs)) / len(outs)
        report[mode] = row
    return report


@torch.no_grad()
def heldout_text_loss(llm: LLM, documents: list[str], seq_len: int = 256, max_windows: int = 64) -> float:
    """Mean next-token cross-entropy (nats/token) of the causal model over windows of `documents`."""
    tok: Tokenizer = llm.tokenizer
    ids: list[int] = []
    for doc in documents:
        ids += tok.encode(doc)
        if len(ids) >= seq_len * max_windows + 1:
            break
    windows = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len, seq_len)][:max_windows]
    if not windows:
        raise ValueError("held-out documents are shorter than one window")
    x = torch.tensor(windows, device=llm.device)
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=llm.device).tril()[None, None]
    total, count = 0.0, 0
    for chunk in x.split(8):
        ctx = ForwardContext(positions=torch.arange(seq_len, device=llm.device).expand(len(chunk), -1), mask=mask)
        logits = llm.model(chunk, ctx)
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
        count += chunk[:, 1:].numel()
    return total / count
