"""Inter-token latency per mode under closed-loop load, in process (the engine alone, no HTTP).

CLIENTS clients each keep one request in flight: when one finishes, the next is added at once, its
mode the next of MODES in turn (the bench's `mixed` rotation), its prompt the next held-out task
chat, 48 max tokens, greedy. For SECONDS the engine is stepped; a request's ITL is (time of its last
token - time of its first) / (tokens - 1), as `trimode bench` computes it, its TTFT the time from
being added to its first token. Prints one JSON line: per mode, requests finished, ITL p50 and
TTFT p50 in ms.

Usage: python scripts/mixed_itl.py MODES [SECONDS] [CLIENTS] [MAX_NUM_BATCHED_TOKENS]
       e.g. python scripts/mixed_itl.py ar 15; python scripts/mixed_itl.py ar,diffusion,selfspec 15
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from itertools import count

from trimode import LLM, SamplingParams
from trimode.tasks import TASKS, held_out


def main(modes: list[str], seconds: float, clients: int, max_num_batched_tokens: int) -> None:
    llm = LLM()
    chats = [e.messages() for t in TASKS for e in held_out(t, 10)]
    engine = llm.engine(max_batch=clients, max_num_batched_tokens=max_num_batched_tokens)
    serial = count()
    mode_of: dict[str, str] = {}
    emitted: dict[str, list[tuple[float, int]]] = {}  # request -> (time, tokens) per step that emitted
    itl: dict[str, list[float]] = {m: [] for m in modes}
    ttft: dict[str, list[float]] = {m: [] for m in modes}
    added: dict[str, float] = {}

    def add() -> None:
        k = next(serial)
        mode_of[f"r{k}"] = modes[k % len(modes)]
        added[f"r{k}"] = time.perf_counter()
        engine.add_request(f"r{k}", chats[k % len(chats)], SamplingParams(mode=mode_of[f"r{k}"], max_tokens=48))

    for _ in range(clients):
        add()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            if out.new_token_ids:
                emitted.setdefault(out.request_id, []).append((now, len(out.new_token_ids)))
            if out.finished:
                steps = emitted.pop(out.request_id, [])
                tokens = sum(n for _, n in steps)
                if steps:
                    ttft[mode_of[out.request_id]].append(steps[0][0] - added.pop(out.request_id))
                if tokens > 1 and len(steps) > 1:
                    itl[mode_of[out.request_id]].append((steps[-1][0] - steps[0][0]) / (tokens - 1))
                add()
    print(
        json.dumps(
            {
                m: {
                    "requests": len(v),
                    "itl_p50_ms": round(1000 * statistics.median(v), 1),
                    "ttft_p50_ms": round(1000 * statistics.median(ttft[m]), 1),
                }
                for m, v in itl.items()
                if v
            }
        )
    )


if __name__ == "__main__":
    main(
        sys.argv[1].split(","),
        float(sys.argv[2]) if len(sys.argv) > 2 else 15.0,
        int(sys.argv[3]) if len(sys.argv) > 3 else 32,
        int(sys.argv[4]) if len(sys.argv) > 4 else 512,
    )
