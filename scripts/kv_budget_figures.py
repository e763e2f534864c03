"""How many requests a fixed KV budget holds at once, and what it allocates: the engine in this
tree (or, with PYTHONPATH pointing at an older checkout, that one) on the same workload.

The workload: the held-out chats of every task, each asking for up to MAX_TOKENS tokens (they end
at EOS long before), all queued at once, AR greedy. Prints one JSON line: peak requests running at
once, peak KV slots allocated, the budget, preemptions, prefix-cache hit tokens, and wall seconds.

Usage: python scripts/kv_budget_figures.py [BUDGET_TOKENS] [MAX_TOKENS] [REQUESTS]
       e.g. python scripts/kv_budget_figures.py 4096 512 64
"""

from __future__ import annotations

import inspect
import json
import sys
import time

from trimode import LLM, SamplingParams
from trimode.tasks import TASKS, held_out


def main(budget: int, max_tokens: int, num_requests: int) -> None:
    llm = LLM()
    chats = [e.messages() for t in TASKS for e in held_out(t, num_requests)][:num_requests]
    # This tree names the budget kv_cache_tokens (a paged pool); older ones max_kv_tokens.
    paged = "kv_cache_tokens" in inspect.signature(llm.engine).parameters
    engine = llm.engine(max_batch=32, **({"kv_cache_tokens": budget} if paged else {"max_kv_tokens": budget}))
    params = SamplingParams(max_tokens=max_tokens)
    for i, chat in enumerate(chats):
        engine.add_request(f"c{i}", chat, params)
    start, running, allocated, tokens = time.perf_counter(), 0, 0, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += len(out.new_token_ids)
        running = max(running, engine.num_running)
        allocated = max(allocated, engine.num_kv_slots_allocated)
    print(
        json.dumps(
            {
                "layout": "paged" if paged else "dense per group",
                "budget_tokens": budget,
                "requests": len(chats),
                "peak_running": running,
                "peak_kv_slots_allocated": allocated,
                "preemptions": getattr(engine, "num_preemptions", 0),
                "prefix_hit_tokens": engine.pool.num_prefix_hits if paged else 0,
                "generated_tokens": tokens,
                "seconds": round(time.perf_counter() - start, 2),
            }
        )
    )


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    main(*(args + [4096, 512, 64][len(args) :]))
