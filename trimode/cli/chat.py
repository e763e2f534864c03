"""`trimode chat`: a terminal chat whose answers stream as they are decoded."""

from __future__ import annotations

import argparse
import itertools
import sys

from trimode.cli.common import (
    add_mode_flags,
    add_model_flags,
    load_llm,
    mode_knobs,
)
from trimode.sampling_params import REQUEST_MODES


def run(args: argparse.Namespace) -> int:
    """A chat in the terminal: each answer streams as it commits; the conversation so far is the
    prompt of the next turn. Line editing and input history come from readline where Python has it."""
    try:
        import readline  # noqa: F401  (input() then edits lines and keeps a history)
    except ImportError:
        pass
    from trimode.sampling_params import SamplingParams

    params = SamplingParams(
        mode=args.mode,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        **mode_knobs(args),
    )
    llm = load_llm(args)
    engine = llm.engine(max_batch=1, max_queue=1)
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    print("trimode chat: /reset forgets the conversation, /exit (or Ctrl-D) leaves", file=sys.stderr)
    for turn in itertools.count():
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        engine.add_tokenized(f"turn-{turn}", llm.tokenizer.encode_chat(history), params)
        answer = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.error is not None:
                    raise ValueError(out.error)
                print(out.delta_text, end="", flush=True)
                answer = out.output or answer
        print()
        if answer is not None:
            history.append({"role": "assistant", "content": answer.text})
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = sub.add_parser("chat", help="chat in the terminal, each answer streamed as it is decoded")
    add_model_flags(c)
    c.add_argument("--mode", default="ar", help=f"one of {', '.join(REQUEST_MODES)} (default ar)")
    c.add_argument("--max-tokens", type=int, default=256, help="tokens per answer at most (default 256)")
    c.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default)")
    c.add_argument("--seed", type=int, help="seed of sampled answers")
    add_mode_flags(c)
    c.add_argument("--system", help="a system message to start the conversation with")
    c.set_defaults(func=run)
