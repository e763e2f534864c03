"""Log-probabilities in OpenAI's two response shapes, from the engine's (vLLM's) per-position
dicts: completions' parallel lists (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`)
and chat's `content` list of {token, logprob, bytes, top_logprobs}; and the bound on how many one
request may ask for."""

from __future__ import annotations

from typing import Any

from trimode.outputs import Logprob, PositionLogprobs
from trimode.sampling_params import SamplingParams
from trimode.tokenizer import Tokenizer

# Scoring costs engine time and response bytes per entry: the issue-24 request (8 prompts of 4,000
# characters, echo, logprobs 20, n 4: 2.7M entries) took 60 s of engine time and answered 64 MB.
MAX_LOGPROB_ENTRIES = 1_000_000


def num_logprob_entries(params: SamplingParams, prompt_lengths: list[int]) -> int:
    """The most log-probabilities an answer to `params` over prompts of these lengths carries: each
    scored position holds its own token's and the top k's (k + 1); with prompt_logprobs (echo) every
    prompt token is scored, with logprobs every generated one; each of the n samples of each prompt."""
    per_sample = [
        (0 if params.prompt_logprobs is None else length * (params.prompt_logprobs + 1))
        + (0 if params.logprobs is None else params.max_tokens * (params.logprobs + 1))
        for length in prompt_lengths
    ]
    return params.n * sum(per_sample)


def check_logprob_entries(params: SamplingParams, prompt_lengths: list[int], cap: int) -> None:
    """ValueError, saying the count, the cap and how to stay under it, past `cap` entries."""
    asked = num_logprob_entries(params, prompt_lengths)
    if asked > cap:
        raise ValueError(
            f"this request asks for {asked:,} log-probabilities: n x the sum over its prompts of "
            "(prompt tokens with echo + max_tokens) x (logprobs + 1); this server answers at most "
            f"{cap:,} per request: send fewer or shorter prompts per request, or a smaller n, logprobs or max_tokens"
        )


def _top(position: PositionLogprobs, k: int) -> list[Logprob]:
    """The k most likely tokens at a position, most likely first (the chosen one among them only
    if it ranks in the k)."""
    return sorted((lp for lp in position.values() if lp.rank <= k), key=lambda lp: lp.rank)


def completion_logprobs(
    tokenizer: Tokenizer, ids: list[int], positions: list[PositionLogprobs | None], k: int, start: int = 0
) -> dict[str, Any]:
    """Completions' `logprobs` for tokens `ids` (a position None: nothing predicted it, the first
    prompt token), their text beginning at character `start` of the choice's text."""
    return {
        "tokens": [tokenizer.decode_token(t) for t in ids],
        "token_logprobs": [None if p is None else p[t].logprob for p, t in zip(positions, ids)],
        "top_logprobs": [None if p is None else {lp.decoded_token: lp.logprob for lp in _top(p, k)} for p in positions],
        "text_offset": tokenizer.offsets(ids, start),
    }


def chat_logprobs(tokenizer: Tokenizer, ids: list[int], positions: list[PositionLogprobs], k: int) -> dict[str, Any]:
    """Chat's `logprobs`: one entry per generated token."""

    def entry(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = []
    for p, t in zip(positions, ids):
        top = [entry(lp.decoded_token or "", lp.logprob) for lp in _top(p, k)]
        content.append({**entry(tokenizer.decode_token(t), p[t].logprob), "top_logprobs": top})
    return {"content": content}
