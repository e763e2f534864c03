"""Log-probabilities in OpenAI's two response shapes, from the engine's (vLLM's) per-position
dicts: completions' parallel lists (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`)
and chat's `content` list of {token, logprob, bytes, top_logprobs}."""

from __future__ import annotations

from typing import Any

from trimode.outputs import Logprob, PositionLogprobs
from trimode.tokenizer import Tokenizer


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
        top = [entry(lp.decoded_token, lp.logprob) for lp in _top(p, k)]
        content.append({**entry(tokenizer.decode_token(t), p[t].logprob), "top_logprobs": top})
    return {"content": content}
