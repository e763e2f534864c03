"""`trimode eval`: task accuracy per mode, tokens per forward and held-out loss."""

from __future__ import annotations

import argparse
import json

from trimode.cli.common import (
    add_mode_flags,
    add_model_flags,
    load_llm,
    mode_knobs,
    mode_list,
)


def run(args: argparse.Namespace) -> int:
    from trimode.evaluate import heldout_text_loss, task_accuracy
    from trimode.tasks import TASKS
    from trimode.train.data import stdlib_texts

    modes = mode_list(args.modes)
    if args.suite != "tasks":
        raise ValueError(f"--suite must be 'tasks' (the held-out synthetic tasks); got {args.suite!r}")
    llm = load_llm(args)
    report = task_accuracy(llm, modes, n=args.num_examples, **mode_knobs(args))
    docs = stdlib_texts(held_out=True)
    result = {
        "accuracy": report,
        "stdlib_heldout_loss_nats": round(heldout_text_loss(llm, docs), 4),
        "num_examples_per_task": args.num_examples,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    same = f"same tokens as {modes[0]}"
    print("| mode | " + " | ".join(TASKS) + f" | tokens/forward | {same} |")
    print("|---" * (len(TASKS) + 3) + "|")
    for mode, row in report.items():
        cells = " | ".join(f"{100 * row[t]:.1f}%" for t in TASKS)
        match = row.get(f"same_tokens_as_{modes[0]}")
        print(
            f"| {mode} | {cells} | {row['tokens_per_forward']:.2f} | "
            f"{'-' if match is None else f'{100 * match:.1f}%'} |"
        )
    print(f"held-out stdlib loss: {result['stdlib_heldout_loss_nats']:.4f} nats/token")
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    e = sub.add_parser("eval", help="task accuracy per mode, tokens per forward, held-out stdlib loss")
    add_model_flags(e)
    e.add_argument("--modes", default="ar,diffusion,selfspec")
    e.add_argument("--suite", default="tasks")
    e.add_argument("--num-examples", type=int, default=100, help="held-out examples per task")
    add_mode_flags(e)
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=run)
